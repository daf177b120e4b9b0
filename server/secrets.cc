#include "server/secrets.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "kernels/core/mutex.h"
#include "server/flags.h"

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

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Every byte of the longer string is read, so the time does not tell how many bytes match.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::StatusOr<std::vector<std::string>> ReadKeys(const std::string& file, const char* flag) {
  std::ifstream in(file);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, ": cannot read ", file));
  std::vector<std::string> keys;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    const absl::string_view k = absl::StripAsciiWhitespace(line);
    if (k.empty() || k.front() == '#') continue;
    if (k.size() < 16)
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", file, " line ", line_no,
                                                     ": a key needs at least 16 bytes"));
    keys.emplace_back(k);
  }
  if (keys.empty())
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", file, " holds no key"));
  return keys;
}

bool BearerMatches(absl::string_view header, const std::vector<std::string>& keys) {
  constexpr absl::string_view kBearer = "Bearer ";
  const bool scheme = header.substr(0, kBearer.size()) == kBearer;
  const absl::string_view got = scheme ? header.substr(kBearer.size()) : header;
  bool any = false;
  for (const std::string& k : keys) any |= ConstantTimeEquals(got, k);
  return scheme && any;
}

absl::StatusOr<std::string> ApiKeyOption::Read() const {
  return ReadSecret("", file, "api-key-file", "SWITCHYARD_API_KEY");
}

void AddApiKeyFlag(FlagSet& flags, ApiKeyOption* o) {
  flags.Add("api-key-file", &o->file,
            "file holding the API key sent as 'authorization: Bearer KEY' (else "
            "$SWITCHYARD_API_KEY)");
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
  sy::MutexLock lock(&mu_);
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
  sy::MutexLock lock(&mu_);
  ++total_;
  if (on_failure_) on_failure_();
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
  sy::MutexLock lock(&mu_);
  return total_;
}

}  // namespace sy::server
