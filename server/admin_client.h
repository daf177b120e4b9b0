// What every Admin client command (`stats`, `status`) shares: the --addr, --admin-token /
// --admin-token-file (else $SWITCHYARD_ADMIN_TOKEN; a token given as a flag is overwritten in
// argv once parsed), TLS and --timeout flags; the channel and stub; the call context with the
// deadline and `authorization: Bearer TOKEN`; and how a failed call is reported (exit 3 for
// UNAUTHENTICATED, else 1).
// Thread safety: one command's main thread.
#pragma once

#include <memory>
#include <string>

#include "grpcpp/client_context.h"
#include "grpcpp/support/status.h"
#include "server/flags.h"
#include "server/tls.h"
#include "switchyard/v1/admin.grpc.pb.h"

namespace sy::server {

class AdminClient {
 public:
  // `command` prefixes every message; `timeout_s` is the default of --timeout.
  AdminClient(std::string command, double timeout_s);
  void AddFlags(FlagSet& flags);
  // After parsing: reads the token and opens the channel. False (the reason printed) when
  // that cannot be done; the command then exits 2.
  bool Connect();

  ::switchyard::v1::Admin::Stub& stub() { return *stub_; }
  // Sets the deadline and the token on a fresh context for one call.
  void Prepare(grpc::ClientContext* ctx) const;
  // Prints "<command>: <addr>: <message>" and returns the exit code of a failed call.
  int Fail(const grpc::Status& status) const;
  const std::string& addr() const { return addr_; }

 private:
  std::string command_;
  std::string addr_ = "127.0.0.1:50051";
  std::string token_, token_file_;
  double timeout_s_;
  TlsClientOptions tls_;
  std::unique_ptr<::switchyard::v1::Admin::Stub> stub_;
};

}  // namespace sy::server
