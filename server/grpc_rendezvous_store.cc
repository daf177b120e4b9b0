#include "server/grpc_rendezvous_store.h"

#include "absl/strings/str_cat.h"
#include "grpcpp/client_context.h"
#include "server/cluster_auth.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;
namespace {

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("rendezvous ", what, ": ", s.error_message()));
}

}  // namespace

GrpcRendezvousStore::GrpcRendezvousStore(std::shared_ptr<grpc::Channel> channel,
                                         std::string secret)
    : stub_(v1::Cluster::NewStub(std::move(channel))), secret_(std::move(secret)) {}

absl::Status GrpcRendezvousStore::Set(const std::string& key, const std::string& value) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::StoreSetRequest req;
  req.set_key(key);
  req.set_value(value);
  SignRequest(secret_, "StoreSet", &req);
  v1::StoreSetReply reply;
  return FromGrpc(stub_->StoreSet(&ctx, req, &reply), absl::StrCat("set ", key));
}

absl::StatusOr<std::string> GrpcRendezvousStore::Get(const std::string& key,
                                                     std::chrono::milliseconds timeout) {
  grpc::ClientContext ctx;
  // The server waits up to `timeout`; the call itself gets a little more for the round trip.
  ctx.set_deadline(std::chrono::system_clock::now() + timeout + std::chrono::seconds(5));
  v1::StoreGetRequest req;
  req.set_key(key);
  req.set_timeout_ms(timeout.count());
  SignRequest(secret_, "StoreGet", &req);
  v1::StoreGetReply reply;
  grpc::Status s = stub_->StoreGet(&ctx, req, &reply);
  if (!s.ok()) return FromGrpc(s, absl::StrCat("get ", key));
  return reply.value();
}

}  // namespace sy::server
