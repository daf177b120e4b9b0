// `switchyard`: the one binary. Subcommands are listed in kCommands.
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

#include "server/commands.h"

namespace {

struct Command {
  const char* name;
  int (*fn)(int, char**);
  const char* summary;
};

const Command kCommands[] = {
    {"make-model", sy::server::MakeModelCommand, "write a synthetic Hugging Face MoE checkpoint"},
    {"run", sy::server::RunCommand, "generate offline from a checkpoint (no server)"},
    {"serve", sy::server::ServeCommand, "serve a model over gRPC with metrics (the daemon)"},
    {"generate", sy::server::GenerateCommand, "stream one answer from a running server"},
    {"loadgen", sy::server::LoadgenCommand, "load a running server; report throughput and latency"},
    {"plan", sy::server::PlanCommand, "plan expert placement from a routing trace and score it"},
    {"worker", sy::server::WorkerCommand, "join a serving leader (serve --secret) as one more rank"},
    {"health", sy::server::HealthCommand, "exit 0 when a running serve is SERVING (grpc.health.v1)"},
    {"status", sy::server::StatusCommand, "the rank group of a running serve: epoch, ranks, states (Admin)"},
    {"stats", sy::server::StatsCommand, "expert-load statistics and live placement of a running serve (Admin)"},
};

void PrintUsage() {
  std::fprintf(stderr, "usage: switchyard COMMAND [flags]   (switchyard COMMAND --help)\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(stderr, "  %-12s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  // A network daemon: a write to a socket whose peer has gone must fail with EPIPE, not kill the
  // process (gRPC and our own sockets use MSG_NOSIGNAL; Gloo's writev() does not).
  std::signal(SIGPIPE, SIG_IGN);
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    PrintUsage();
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : kCommands) {
    if (std::string(argv[1]) == c.name) return c.fn(argc - 2, argv + 2);
  }
  std::fprintf(stderr, "switchyard: unknown command '%s'\n", argv[1]);
  PrintUsage();
  return 2;
}
