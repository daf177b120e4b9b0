// The engine that connects the rank processes of a group (`serve --transport`): "tcp"
// (TcpCommunicator, the default: the calling thread does its own socket I/O) or "gloo"
// (GlooCommunicator). Every rank of a group uses the leader's choice (the join reply says it).
#pragma once

#include <chrono>
#include <string>

#include "absl/status/statusor.h"
#include "parallel/membership.h"
#include "parallel/rendezvous_store.h"

namespace sy::parallel {

inline constexpr char kDefaultTransport[] = "tcp";

// INVALID_ARGUMENT for a name other than "tcp" or "gloo". store: not owned; must be
// thread-safe and outlive the factory. hostname: the address this rank listens on and
// announces.
absl::StatusOr<CommunicatorFactory> ProcessCommunicatorFactory(const std::string& transport,
                                                               RendezvousStore* store,
                                                               const std::string& hostname,
                                                               std::chrono::milliseconds timeout);

}  // namespace sy::parallel
