#include "server/tls.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/support/channel_arguments.h"
#include "kernels/core/status.h"
#include "server/flags.h"

namespace sy::server {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const std::string& flag) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  if (ss.str().find("-----BEGIN") == std::string::npos)
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " is not PEM"));
  return ss.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsServerOptions& o, const std::string& prefix) {
  if (!o.enabled()) {
    if (!o.key.empty() || !o.client_ca.empty())
      return absl::InvalidArgumentError(
          absl::StrCat("--", prefix, "-key and --", prefix, "-client-ca need --", prefix, "-cert"));
    return grpc::InsecureServerCredentials();
  }
  if (o.key.empty())
    return absl::InvalidArgumentError(absl::StrCat("--", prefix, "-cert needs --", prefix, "-key"));
  grpc::SslServerCredentialsOptions opts(
      o.client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  SY_ASSIGN_OR_RETURN(pair.private_key, ReadPem(o.key, prefix + "-key"));
  SY_ASSIGN_OR_RETURN(pair.cert_chain, ReadPem(o.cert, prefix + "-cert"));
  opts.pem_key_cert_pairs.push_back(pair);
  if (!o.client_ca.empty()) {
    SY_ASSIGN_OR_RETURN(opts.pem_root_certs, ReadPem(o.client_ca, prefix + "-client-ca"));
  }
  return grpc::SslServerCredentials(opts);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsClientOptions& o) {
  if (!o.enabled()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions opts;
  if (!o.ca.empty()) {
    SY_ASSIGN_OR_RETURN(opts.pem_root_certs, ReadPem(o.ca, "tls-ca"));
  }
  if (!o.cert.empty() || !o.key.empty()) {
    if (o.cert.empty() || o.key.empty())
      return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
    SY_ASSIGN_OR_RETURN(opts.pem_cert_chain, ReadPem(o.cert, "tls-cert"));
    SY_ASSIGN_OR_RETURN(opts.pem_private_key, ReadPem(o.key, "tls-key"));
  }
  return grpc::SslCredentials(opts);
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& addr,
                                                           const TlsClientOptions& o) {
  SY_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds, MakeChannelCredentials(o));
  grpc::ChannelArguments args;
  if (!o.server_name.empty()) args.SetSslTargetNameOverride(o.server_name);
  return grpc::CreateCustomChannel(addr, creds, args);
}

void AddTlsClientFlags(FlagSet& flags, TlsClientOptions* o) {
  flags.Add("tls", &o->tls, "connect with TLS (the system's roots verify the server)");
  flags.Add("tls-ca", &o->ca, "PEM CA file that verifies the server (implies --tls)");
  flags.Add("tls-cert", &o->cert, "PEM client certificate, for a server with --tls-client-ca");
  flags.Add("tls-key", &o->key, "PEM key of --tls-cert");
  flags.Add("tls-server-name", &o->server_name,
            "name to check in the server's certificate (default: the host of the address)");
}

}  // namespace sy::server
