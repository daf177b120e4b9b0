// Authentication of switchyard.v1.Cluster calls without sending the cluster secret.
//
// Every Cluster request has a string field `auth`. The caller sets it to
//   hmac-sha256:v1:<unix time ms>:<nonce, 32 hex>:<mac, 64 hex>
// where mac = HMAC-SHA256(secret, "switchyard-cluster-v1\n" method "\n" time "\n" nonce "\n"
// request), `request` being the request serialized deterministically with `auth` empty. The
// leader recomputes the MAC (constant-time compare), accepts times within `window` of its own
// clock, and remembers every accepted nonce for twice the window, so a recorded call cannot be
// replayed, sent to another method, or altered. Someone who reads the wire learns neither the
// secret nor anything they can reuse; they do read the calls themselves (use the cluster's
// mutual TLS for that, server/tls.h).
// Thread safety: SignClusterCall is a plain function; ClusterCallVerifier is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <string>
#include "absl/strings/string_view.h"
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "google/protobuf/message.h"
#include "kernels/core/mutex.h"

namespace sy::server {

// The `auth` value for `request` (its own `auth` field is ignored) to `method` ("Join", ...).
std::string SignClusterCall(const std::string& secret, absl::string_view method,
                            const google::protobuf::Message& request,
                            std::chrono::system_clock::time_point now = std::chrono::system_clock::now());

// Sets `request`'s auth field (every Cluster request type) for `method`.
template <typename Request>
void SignRequest(const std::string& secret, absl::string_view method, Request* request) {
  request->set_auth(SignClusterCall(secret, method, *request));
}

class ClusterCallVerifier {
 public:
  explicit ClusterCallVerifier(std::string secret,
                               std::chrono::milliseconds window = std::chrono::seconds(60));

  // OK when `auth` signs `request` for `method` with the secret, within the window, with a
  // nonce not seen before; PERMISSION_DENIED saying which check failed otherwise (never
  // anything about the secret). An empty secret refuses everything.
  absl::Status Verify(absl::string_view method, const google::protobuf::Message& request,
                      absl::string_view auth,
                      std::chrono::system_clock::time_point now = std::chrono::system_clock::now());

  // Nonces remembered at most (accepted calls only, so only holders of the secret fill it);
  // past it, calls are refused (RESOURCE_EXHAUSTED) until older nonces expire.
  static constexpr size_t kMaxNonces = 1 << 20;

 private:
  const std::string secret_;
  const std::chrono::milliseconds window_;
  sy::Mutex mu_;
  // Accepted nonces and when each may be forgotten (oldest first).
  absl::flat_hash_set<std::string> seen_ ABSL_GUARDED_BY(mu_);
  std::deque<std::pair<int64_t, std::string>> expiry_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sy::server
