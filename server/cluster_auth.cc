#include "server/cluster_auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <memory>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "kernels/core/mutex.h"

namespace sy::server {
namespace {

constexpr absl::string_view kScheme = "hmac-sha256:v1:";

int64_t UnixMs(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

// The request's bytes with its `auth` field cleared (deterministic serialization).
std::string BodyOf(const google::protobuf::Message& request) {
  std::unique_ptr<google::protobuf::Message> copy(request.New());
  copy->CopyFrom(request);
  const google::protobuf::FieldDescriptor* f = copy->GetDescriptor()->FindFieldByName("auth");
  if (f != nullptr) copy->GetReflection()->ClearField(copy.get(), f);
  std::string out;
  {
    google::protobuf::io::StringOutputStream raw(&out);
    google::protobuf::io::CodedOutputStream coded(&raw);
    coded.SetSerializationDeterministic(true);
    copy->SerializeToCodedStream(&coded);
  }
  return out;
}

std::string Mac(const std::string& secret, absl::string_view method, absl::string_view time,
                absl::string_view nonce, const std::string& body) {
  const std::string msg =
      absl::StrCat("switchyard-cluster-v1\n", method, "\n", time, "\n", nonce, "\n", body);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out, &len);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(out), len));
}

}  // namespace

std::string SignClusterCall(const std::string& secret, absl::string_view method,
                            const google::protobuf::Message& request,
                            std::chrono::system_clock::time_point now) {
  unsigned char nonce_bytes[16];
  if (RAND_bytes(nonce_bytes, sizeof nonce_bytes) != 1) {
    // The OS's generator failed (never seen): a call with this nonce is refused, not forged.
    std::fill(std::begin(nonce_bytes), std::end(nonce_bytes), 0);
  }
  const std::string nonce = absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(nonce_bytes), sizeof nonce_bytes));
  const std::string time = absl::StrCat(UnixMs(now));
  return absl::StrCat(kScheme, time, ":", nonce, ":", Mac(secret, method, time, nonce, BodyOf(request)));
}

ClusterCallVerifier::ClusterCallVerifier(std::string secret, std::chrono::milliseconds window)
    : secret_(std::move(secret)), window_(window) {}

absl::Status ClusterCallVerifier::Verify(absl::string_view method,
                                         const google::protobuf::Message& request,
                                         absl::string_view auth,
                                         std::chrono::system_clock::time_point now) {
  auto denied = [](absl::string_view why) {
    return absl::PermissionDeniedError(absl::StrCat("cluster call refused: ", why));
  };
  if (secret_.empty()) return denied("this leader has no cluster secret");
  if (auth.empty())
    return denied("no auth (the worker needs the cluster secret: --secret-file or --secret)");
  if (auth.size() > 256 || auth.substr(0, kScheme.size()) != kScheme)
    return denied("auth is not hmac-sha256:v1 (a worker of another version?)");
  const std::vector<absl::string_view> parts = absl::StrSplit(auth.substr(kScheme.size()), ':');
  int64_t t = 0;
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[0], &t) || parts[1].size() != 32 ||
      parts[2].size() != 64)
    return denied("malformed auth");
  const std::string want = Mac(secret_, method, parts[0], parts[1], BodyOf(request));
  if (CRYPTO_memcmp(want.data(), parts[2].data(), want.size()) != 0)
    return denied("wrong cluster secret");
  const int64_t ms = UnixMs(now);
  if (t < ms - window_.count() || t > ms + window_.count())
    return denied(absl::StrCat("signed ", (ms - t) / 1000, " s from this leader's clock (more than ",
                               window_.count() / 1000, " s: are the hosts' clocks set?)"));
  sy::MutexLock lock(&mu_);
  while (!expiry_.empty() && expiry_.front().first < ms) {
    seen_.erase(expiry_.front().second);
    expiry_.pop_front();
  }
  std::string nonce(parts[1]);
  if (seen_.contains(nonce)) return denied("replayed (this nonce was used already)");
  if (seen_.size() >= kMaxNonces)
    return absl::ResourceExhaustedError("cluster call refused: too many calls in the replay window");
  seen_.insert(nonce);
  // Kept until no call with this time can be accepted any more (its time + the window),
  // measured on this clock, which may run behind the signer's.
  expiry_.emplace_back(std::max(ms, t) + 2 * window_.count(), std::move(nonce));
  return absl::OkStatus();
}

}  // namespace sy::server
