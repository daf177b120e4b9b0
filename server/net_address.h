// Addresses a rank announces to its peers (DESIGN.md §9: never 127.0.0.1 by default when the
// peers are elsewhere). Used by `serve` (the leader's rank address) and `worker`.
// Thread safety: plain functions.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace sy::server {

// The local IPv4 address of the interface that routes to `host` (a name or an address; no
// packet is sent: a UDP socket is connected and asked for its own address). A loopback host
// gives a loopback address. NOT_FOUND when `host` does not resolve.
absl::StatusOr<std::string> LocalAddressTowards(const std::string& host);

// The first IPv4 address, not a loopback one, that this machine's host name resolves to;
// "127.0.0.1" when there is none.
std::string HostAddress();

// "HOST:PORT" -> HOST (brackets of an IPv6 literal removed).
std::string HostOf(const std::string& host_port);

}  // namespace sy::server
