// Addresses a rank announces (server/net_address.h): the interface towards a loopback host is
// a loopback address, towards a name that does not resolve NOT_FOUND; HostOf splits HOST:PORT.
#include "server/net_address.h"

#include "gtest/gtest.h"

namespace sy::server {
namespace {

TEST(NetAddressTest, TheInterfaceTowardsALoopbackHostIsALoopbackAddress) {
  auto a = LocalAddressTowards("127.0.0.1");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a, "127.0.0.1");
  auto b = LocalAddressTowards("localhost");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->rfind("127.", 0), 0u) << *b;
  EXPECT_EQ(LocalAddressTowards("no-such-host.invalid").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(HostAddress().empty());
}

TEST(NetAddressTest, HostOfSplitsHostAndPort) {
  EXPECT_EQ(HostOf("leader:50052"), "leader");
  EXPECT_EQ(HostOf("10.0.0.7:1"), "10.0.0.7");
  EXPECT_EQ(HostOf("[::1]:50052"), "::1");
  EXPECT_EQ(HostOf("leader"), "leader");
}

}  // namespace
}  // namespace sy::server
