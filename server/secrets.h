// Where the daemon's secrets come from (the cluster secret, the admin token), so that they
// need not show in `ps`: a file (`--secret-file`, `--admin-token-file`; one line, trailing
// whitespace dropped), else the flag, else the environment variable.
// ReadKeys: the API keys of `serve --api-key-file` (one per line). BearerMatches: the
// "authorization: Bearer KEY" check of Inference and Admin, in constant time.
// AuthLimiter: failed secret or token checks per peer address, so that guessing is slow.
// Thread safety: the functions are plain; AuthLimiter is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "kernels/core/mutex.h"

namespace sy::server {

// The secret: the contents of `file` when set (NOT_FOUND / INVALID_ARGUMENT naming the flag
// when it cannot be read or is empty), else `value`, else $env (may be "").
absl::StatusOr<std::string> ReadSecret(const std::string& value, const std::string& file,
                                       const char* file_flag, const char* env);

// True when a and b are equal; the time taken depends on their lengths only.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

// The keys in `file`: one per line, surrounding whitespace dropped, blank lines and lines
// starting with '#' skipped. NOT_FOUND / INVALID_ARGUMENT naming `flag` when the file cannot be
// read, holds no key, or a key is shorter than 16 bytes.
absl::StatusOr<std::vector<std::string>> ReadKeys(const std::string& file, const char* flag);

// True when `header` (the value of the "authorization" metadata) is "Bearer K" for one of
// `keys`. Every key is compared in full, whichever matches.
bool BearerMatches(absl::string_view header, const std::vector<std::string>& keys);

class FlagSet;

// The API key a client command sends ("authorization: Bearer KEY"): `--api-key-file` (the
// file's first line) else $SWITCHYARD_API_KEY; "" when neither is set.
struct ApiKeyOption {
  std::string file;
  absl::StatusOr<std::string> Read() const;
};
void AddApiKeyFlag(FlagSet& flags, ApiKeyOption* o);

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
  // Called on every Failed, under the limiter's lock (e.g. a metric's counter).
  void set_on_failure(std::function<void()> f) {
    sy::MutexLock lock(&mu_);
    on_failure_ = std::move(f);
  }

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
  mutable sy::Mutex mu_;
  std::map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);
  int64_t total_ ABSL_GUARDED_BY(mu_) = 0;
  std::function<void()> on_failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sy::server
