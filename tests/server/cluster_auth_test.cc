// Cluster call signatures (server/cluster_auth.h): what a leader accepts and what it refuses,
// and that the secret never appears in what crosses the wire.
#include "server/cluster_auth.h"

#include <chrono>
#include <string>

#include "gtest/gtest.h"
#include "switchyard/v1/cluster.pb.h"

namespace sy::server {
namespace {

namespace v1 = ::switchyard::v1;
using std::chrono::seconds;

constexpr char kSecret[] = "a-cluster-secret-of-some-length";

v1::StoreSetRequest SetRequest(const std::string& value) {
  v1::StoreSetRequest r;
  r.set_key("gloo/epoch-1/rank-0");
  r.set_value(value);
  return r;
}

TEST(ClusterAuthTest, ASignedCallIsAcceptedOnceAndTheSecretNeverCrossesTheWire) {
  ClusterCallVerifier verifier(kSecret);
  v1::StoreSetRequest r = SetRequest("addr");
  SignRequest(kSecret, "StoreSet", &r);
  EXPECT_EQ(r.auth().rfind("hmac-sha256:v1:", 0), 0u) << r.auth();
  const std::string wire = r.SerializeAsString();
  EXPECT_EQ(wire.find(kSecret), std::string::npos);
  EXPECT_TRUE(verifier.Verify("StoreSet", r, r.auth()).ok());
  // The same bytes again: a replay.
  const absl::Status again = verifier.Verify("StoreSet", r, r.auth());
  EXPECT_EQ(again.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(again.message().find("replayed"), std::string::npos) << again;
  // A fresh signature of the same request is a new call.
  SignRequest(kSecret, "StoreSet", &r);
  EXPECT_TRUE(verifier.Verify("StoreSet", r, r.auth()).ok());
}

TEST(ClusterAuthTest, WrongSecretOtherMethodAlteredBodyAndBadFormsAreRefused) {
  ClusterCallVerifier verifier(kSecret);
  auto refused = [&](const google::protobuf::Message& req, const std::string& method,
                     const std::string& auth, const std::string& says) {
    const absl::Status s = verifier.Verify(method, req, auth);
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << says;
    EXPECT_NE(s.message().find(says), std::string::npos) << s;
    EXPECT_EQ(s.message().find(kSecret), std::string::npos);
  };
  v1::StoreSetRequest r = SetRequest("addr");
  refused(r, "StoreSet", SignClusterCall("not-the-secret", "StoreSet", r), "wrong cluster secret");
  refused(r, "StoreGet", SignClusterCall(kSecret, "StoreSet", r), "wrong cluster secret");
  const std::string signed_for_addr = SignClusterCall(kSecret, "StoreSet", r);
  refused(SetRequest("evil"), "StoreSet", signed_for_addr, "wrong cluster secret");
  refused(r, "StoreSet", "", "no auth");
  refused(r, "StoreSet", kSecret, "not hmac-sha256:v1");  // an old worker sending the secret
  refused(r, "StoreSet", "hmac-sha256:v1:1:2:3", "malformed");
  refused(r, "StoreSet", std::string(300, 'h'), "not hmac-sha256:v1");
  // The auth field itself is not signed (it holds the signature): any value there verifies
  // the same body.
  v1::StoreSetRequest with_auth = r;
  with_auth.set_auth("anything");
  EXPECT_TRUE(verifier.Verify("StoreSet", with_auth, signed_for_addr).ok());
}

TEST(ClusterAuthTest, CallsSignedOutsideTheWindowAreRefused) {
  ClusterCallVerifier verifier(kSecret, std::chrono::milliseconds(60000));
  const auto now = std::chrono::system_clock::now();
  v1::HeartbeatRequest r;
  r.set_rank(3);
  r.set_instance(99);
  const absl::Status old =
      verifier.Verify("Heartbeat", r, SignClusterCall(kSecret, "Heartbeat", r, now - seconds(61)), now);
  EXPECT_EQ(old.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(old.message().find("clock"), std::string::npos) << old;
  EXPECT_FALSE(
      verifier.Verify("Heartbeat", r, SignClusterCall(kSecret, "Heartbeat", r, now + seconds(61)), now).ok());
  EXPECT_TRUE(
      verifier.Verify("Heartbeat", r, SignClusterCall(kSecret, "Heartbeat", r, now - seconds(59)), now).ok());
  EXPECT_TRUE(
      verifier.Verify("Heartbeat", r, SignClusterCall(kSecret, "Heartbeat", r, now + seconds(59)), now).ok());
}

TEST(ClusterAuthTest, ANonceIsRememberedForTheWholeWindowThenForgotten) {
  ClusterCallVerifier verifier(kSecret, std::chrono::milliseconds(1000));
  const auto t0 = std::chrono::system_clock::now();
  v1::LeaveRequest r;
  r.set_rank(1);
  const std::string auth = SignClusterCall(kSecret, "Leave", r, t0);
  EXPECT_TRUE(verifier.Verify("Leave", r, auth, t0).ok());
  // Within the window the nonce is known; after it the time alone refuses the call.
  EXPECT_NE(verifier.Verify("Leave", r, auth, t0 + std::chrono::milliseconds(900))
                .message()
                .find("replayed"),
            std::string::npos);
  const absl::Status late = verifier.Verify("Leave", r, auth, t0 + seconds(5));
  EXPECT_EQ(late.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(late.message().find("clock"), std::string::npos) << late;
}

TEST(ClusterAuthTest, ALeaderWithoutASecretRefusesEverything) {
  ClusterCallVerifier verifier("");
  v1::LeaveRequest r;
  EXPECT_EQ(verifier.Verify("Leave", r, SignClusterCall("", "Leave", r)).code(),
            absl::StatusCode::kPermissionDenied);
}

}  // namespace
}  // namespace sy::server
