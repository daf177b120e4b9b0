// Secrets and failed-auth limits (server/secrets.h): a secret file wins over the flag and the
// environment (trailing newline dropped; unreadable or empty files name the flag); a peer that
// fails too often is refused for a while, others are not; gRPC peer strings to addresses.
#include "server/secrets.h"

#include <cstdlib>
#include <fstream>
#include <thread>

#include "gtest/gtest.h"
#include "tests/testing/model_fixtures.h"

namespace sy::server {
namespace {

TEST(SecretsTest, AFileWinsOverTheFlagAndTheEnvironment) {
  const std::string dir = sy::testing::MakeTempDir("secrets");
  const std::string file = dir + "/secret";
  std::ofstream(file) << "from-the-file\n";
  setenv("SY_TEST_SECRET", "from-env", 1);
  EXPECT_EQ(*ReadSecret("flag", file, "secret-file", "SY_TEST_SECRET"), "from-the-file");
  EXPECT_EQ(*ReadSecret("flag", "", "secret-file", "SY_TEST_SECRET"), "flag");
  EXPECT_EQ(*ReadSecret("", "", "secret-file", "SY_TEST_SECRET"), "from-env");
  unsetenv("SY_TEST_SECRET");
  EXPECT_EQ(*ReadSecret("", "", "secret-file", "SY_TEST_SECRET"), "");
  auto missing = ReadSecret("", dir + "/nope", "secret-file", "SY_TEST_SECRET");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("--secret-file"), absl::string_view::npos);
  std::ofstream(dir + "/empty") << "\n";
  EXPECT_EQ(ReadSecret("", dir + "/empty", "secret-file", "X").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AuthLimiterTest, APeerThatFailsTooOftenIsRefusedForAWhileAndOthersAreNot) {
  AuthLimiter limiter(3, std::chrono::milliseconds(300));
  const std::string bad = "ipv4:10.1.2.3:4000", other = "ipv4:10.1.2.4:4000";
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(limiter.Admit(bad).ok()) << i;
    limiter.Failed("ipv4:10.1.2.3:" + std::to_string(5000 + i));  // any port of that address
  }
  EXPECT_EQ(limiter.Admit(bad).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(limiter.Admit(other).ok());
  EXPECT_EQ(limiter.failures(), 3);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_TRUE(limiter.Admit(bad).ok());
}

TEST(AuthLimiterTest, PeerStringsGiveAddressesAndLoopbackIsRecognised) {
  EXPECT_EQ(AuthLimiter::AddressOf("ipv4:127.0.0.1:50051"), "127.0.0.1");
  EXPECT_EQ(AuthLimiter::AddressOf("ipv6:[::1]:50051"), "::1");
  EXPECT_TRUE(AuthLimiter::IsLoopback("ipv4:127.0.0.1:1"));
  EXPECT_TRUE(AuthLimiter::IsLoopback("ipv6:[::1]:1"));
  EXPECT_TRUE(AuthLimiter::IsLoopback("ipv6:[::ffff:127.0.0.1]:1"));
  EXPECT_FALSE(AuthLimiter::IsLoopback("ipv4:10.0.0.5:1"));
  EXPECT_FALSE(AuthLimiter::IsLoopback("ipv4:172.17.0.1:1"));
}

TEST(SecretsTest, ConstantTimeEqualsComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("abcd", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
}

TEST(SecretsTest, BearerMatchesOnlyTheWholeSchemeAndKey) {
  const std::vector<std::string> keys = {"first-key-0123456789", "second-key-0123456789"};
  EXPECT_TRUE(BearerMatches("Bearer first-key-0123456789", keys));
  EXPECT_TRUE(BearerMatches("Bearer second-key-0123456789", keys));
  EXPECT_FALSE(BearerMatches("first-key-0123456789", keys));
  EXPECT_FALSE(BearerMatches("Bearer first-key-012345678", keys));
  EXPECT_FALSE(BearerMatches("Bearer first-key-0123456789x", keys));
  EXPECT_FALSE(BearerMatches("Basic first-key-0123456789", keys));
  EXPECT_FALSE(BearerMatches("Bearer ", keys));
  EXPECT_FALSE(BearerMatches("", {}));
}

}  // namespace
}  // namespace sy::server
