// Where the daemon's secrets come from (the cluster secret, the admin token), so that they
// need not show in `ps`: a file (`--secret-file`, `--admin-token-file`; one line, trailing
// whitespace dropped), else the flag, else the environment variable.
// AuthLimiter: failed secret or token checks per peer address, so that guessing is slow.
// Thread safety: ReadSecret is a plain function; AuthLimiter is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"

namespace sy::server {

// The secret: the contents of `file` when set (NOT_FOUND / INVALID_ARGUMENT naming the flag
// when it cannot be read or is empty), else `value`, else $env (may be "").
absl::StatusOr<std::string> ReadSecret(const std::string& value, const std::string& file,
                                       const char* file_flag, const char* env);

class AuthLimiter {
 public:
  // `max_failures` failed attempts per peer within `window` refuse that peer until the window
  // has passed since its latest failure.
  explicit AuthLimiter(int max_failures = 10,
                       std::chrono::milliseconds window = std::chrono::seconds(10))
      : max_failures_(max_failures), window_(window) {}
  // OK, or RESOURCE_EXHAUSTED when `peer` failed too often lately.
  absl::Status Admit(const std::string& peer);
  void Failed(const std::string& peer);
  int64_t failures() const;  // since start, every peer

  // The address part of a gRPC peer string ("ipv4:10.0.0.5:4711" -> "10.0.0.5").
  static std::string AddressOf(const std::string& grpc_peer);
  static bool IsLoopback(const std::string& grpc_peer);

 private:
  struct Peer {
    int failures = 0;
    std::chrono::steady_clock::time_point last{};
  };
  const int max_failures_;
  const std::chrono::milliseconds window_;
  mutable std::mutex mu_;
  std::map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);
  int64_t total_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace sy::server
