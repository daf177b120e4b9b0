#include "server/secrets.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace sy::server {

absl::StatusOr<std::string> ReadSecret(const std::string& value, const std::string& file,
                                       const char* file_flag, const char* env) {
  if (!file.empty()) {
    std::ifstream in(file);
    if (!in) return absl::NotFoundError(absl::StrCat("--", file_flag, ": cannot read ", file));
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t'))
      s.pop_back();
    if (s.empty()) return absl::InvalidArgumentError(absl::StrCat("--", file_flag, ": ", file, " is empty"));
    return s;
  }
  if (!value.empty()) return value;
  if (const char* e = std::getenv(env)) return std::string(e);
  return std::string();
}

std::string AuthLimiter::AddressOf(const std::string& peer) {
  // "ipv4:1.2.3.4:5", "ipv6:[::1]:5", "unix:/path"
  std::string s = peer;
  const size_t colon = s.find(':');
  if (colon != std::string::npos) s = s.substr(colon + 1);
  if (!s.empty() && s.front() == '[') {
    const size_t close = s.find(']');
    return close == std::string::npos ? s : s.substr(1, close - 1);
  }
  const size_t last = s.rfind(':');
  return last == std::string::npos ? s : s.substr(0, last);
}

bool AuthLimiter::IsLoopback(const std::string& peer) {
  if (peer.rfind("unix:", 0) == 0) return true;
  const std::string a = AddressOf(peer);
  return a.rfind("127.", 0) == 0 || a == "::1" || a.rfind("::ffff:127.", 0) == 0;
}

absl::Status AuthLimiter::Admit(const std::string& peer) {
  const std::string a = AddressOf(peer);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = peers_.find(a);
  if (it == peers_.end()) return absl::OkStatus();
  const auto now = std::chrono::steady_clock::now();
  if (now - it->second.last > window_) {
    peers_.erase(it);
    return absl::OkStatus();
  }
  if (it->second.failures >= max_failures_)
    return absl::ResourceExhaustedError(absl::StrCat(
        "too many failed authentication attempts from ", a, "; wait ",
        std::chrono::duration_cast<std::chrono::seconds>(window_).count(), " s"));
  return absl::OkStatus();
}

void AuthLimiter::Failed(const std::string& peer) {
  const std::string a = AddressOf(peer);
  std::lock_guard<std::mutex> lock(mu_);
  ++total_;
  Peer& p = peers_[a];
  const auto now = std::chrono::steady_clock::now();
  if (now - p.last > window_) p.failures = 0;
  ++p.failures;
  p.last = now;
  if (peers_.size() > 10000) {  // bounded: forget quiet peers
    for (auto it = peers_.begin(); it != peers_.end();)
      it = now - it->second.last > window_ ? peers_.erase(it) : std::next(it);
  }
}

int64_t AuthLimiter::failures() const {
  std::lock_guard<std::mutex> lock(mu_);
  return total_;
}

}  // namespace sy::server
