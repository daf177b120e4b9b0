#include "server/admin_client.h"

#include <chrono>
#include <cstdio>

#include "server/secrets.h"

namespace sy::server {

AdminClient::AdminClient(std::string command, double timeout_s)
    : command_(std::move(command)), timeout_s_(timeout_s) {}

void AdminClient::AddFlags(FlagSet& flags) {
  flags.Add("addr", &addr_, "server address HOST:PORT");
  flags.Add("admin-token", &token_, "Admin bearer token (default: SWITCHYARD_ADMIN_TOKEN)");
  flags.Add("admin-token-file", &token_file_, "read the Admin bearer token from this file");
  flags.MarkSecret("admin-token", "admin-token-file");
  flags.Add("timeout", &timeout_s_, "deadline in seconds (per call)");
  AddTlsClientFlags(flags, &tls_);
}

bool AdminClient::Connect() {
  auto t = ReadSecret(token_, token_file_, "admin-token-file", "SWITCHYARD_ADMIN_TOKEN");
  if (!t.ok()) {
    std::fprintf(stderr, "%s: %s\n", command_.c_str(), std::string(t.status().message()).c_str());
    return false;
  }
  token_ = *t;
  auto channel = MakeChannel(addr_, tls_);
  if (!channel.ok()) {
    std::fprintf(stderr, "%s: %s\n", command_.c_str(),
                 std::string(channel.status().message()).c_str());
    return false;
  }
  stub_ = ::switchyard::v1::Admin::NewStub(*channel);
  return true;
}

void AdminClient::Prepare(grpc::ClientContext* ctx) const {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000)));
  if (!token_.empty()) ctx->AddMetadata("authorization", "Bearer " + token_);
}

int AdminClient::Fail(const grpc::Status& status) const {
  std::fprintf(stderr, "%s: %s: %s\n", command_.c_str(), addr_.c_str(),
               status.error_message().c_str());
  return status.error_code() == grpc::StatusCode::UNAUTHENTICATED ? 3 : 1;
}

}  // namespace sy::server
