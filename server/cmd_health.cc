// `switchyard health --addr HOST:PORT`: the grpc.health.v1 Check of a running server, for
// container health checks and scripts. Prints the serving status; exit status 0 only when
// it is SERVING, 1 otherwise (NOT_SERVING, UNKNOWN, unreachable), 2 on bad flags.
#include <chrono>
#include <cstdio>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/commands.h"
#include "server/flags.h"
#include "server/tls.h"

namespace sy::server {

int HealthCommand(int argc, char** argv) {
  std::string addr = "127.0.0.1:50051", service;
  double timeout_s = 3;
  bool quiet = false;
  FlagSet flags("health", "The health of a running `switchyard serve` (grpc.health.v1 Check).\n"
                          "Exit status 0 only when SERVING.\n"
                          "usage: switchyard health --addr HOST:PORT");
  flags.Add("addr", &addr, "server address HOST:PORT");
  flags.Add("service", &service, "service name to check (empty: the whole server)");
  flags.Add("timeout", &timeout_s, "deadline in seconds");
  flags.Add("quiet", &quiet, "print nothing");
  TlsClientOptions tls;
  AddTlsClientFlags(flags, &tls);
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  auto channel = MakeChannel(addr, tls);
  if (!channel.ok()) {
    std::fprintf(stderr, "health: %s\n", std::string(channel.status().message()).c_str());
    return 2;
  }
  auto stub = grpc::health::v1::Health::NewStub(*channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  const grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok()) {
    if (!quiet) std::printf("UNREACHABLE: %s: %s\n", addr.c_str(), s.error_message().c_str());
    return 1;
  }
  const std::string name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
  if (!quiet) std::printf("%s\n", name.c_str());
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace sy::server
