// TLS for the daemon's gRPC ports with gRPC's own credentials, and the matching client side
// for every `switchyard` client command.
//   Server: --tls-cert/--tls-key (PEM) turn on TLS; --tls-client-ca makes it mutual (a client
//     must present a certificate that CA signed, else the handshake fails: UNAVAILABLE).
//   Client: --tls-ca verifies the server (the system roots when empty), --tls-cert/--tls-key
//     present a client certificate, --tls-server-name overrides the name checked against the
//     server's certificate. A plaintext client to a TLS port (or the reverse) cannot connect.
// The Cluster service takes the same server options (--cluster-tls-*): ranks then reach the
// leader only with a certificate of that CA (mutual TLS), and verify the leader.
// Thread safety: plain functions.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace sy::server {

class FlagSet;

struct TlsServerOptions {
  std::string cert;       // PEM certificate chain file; empty: plaintext
  std::string key;        // PEM private key file
  std::string client_ca;  // PEM CA file; set: clients must present a certificate it signed
  bool enabled() const { return !cert.empty(); }
};

struct TlsClientOptions {
  bool tls = false;       // connect with TLS (implied by any of the files below)
  std::string ca;         // PEM roots to verify the server; empty: the system's
  std::string cert, key;  // a client certificate (mutual TLS)
  std::string server_name;  // the name to check in the server's certificate; empty: the host
  bool enabled() const { return tls || !ca.empty() || !cert.empty(); }
};

// INVALID_ARGUMENT naming the flag when a file cannot be read or only one of cert/key is set.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsServerOptions& o, const std::string& flag_prefix = "tls");
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsClientOptions& o);
// A channel to `addr` with `o` (TLS, or plaintext when not enabled).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& addr,
                                                           const TlsClientOptions& o);

// --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name for client commands.
void AddTlsClientFlags(FlagSet& flags, TlsClientOptions* o);

}  // namespace sy::server
