// The `switchyard` subcommands. Each takes the arguments after its name (argv[0] is the
// first flag) and returns the process exit code. switchyard_main.cc dispatches to them.
#pragma once

namespace sy::server {

int MakeModelCommand(int argc, char** argv);  // model/ synthetic checkpoint writer
int RunCommand(int argc, char** argv);        // offline generation
int ServeCommand(int argc, char** argv);      // the gRPC daemon (server/daemon.h)
int GenerateCommand(int argc, char** argv);   // gRPC client: stream one answer
int LoadgenCommand(int argc, char** argv);    // gRPC load generator (server/loadgen.h)


int PlanCommand(int argc, char** argv);       // expert placement planners (parallel/planner)
int WorkerCommand(int argc, char** argv);     // join a leader as one more rank (server/worker.h)
int StatsCommand(int argc, char** argv);      // Admin client: expert load, placement (cmd_stats.cc)
int StatusCommand(int argc, char** argv);     // Admin client: the rank group (cmd_status.cc)
int HealthCommand(int argc, char** argv);     // grpc.health.v1 Check; exit 0 when SERVING

}  // namespace sy::server
