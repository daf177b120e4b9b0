// GlooCommunicator: ranks as processes over TCP, the CPU engine for multi-process and
// multi-host runs (DESIGN.md §3), on Debian's libgloo (gloo 2022-05).
//
// Creation: each rank opens a gloo TCP device on `hostname` (or `iface`), publishes its
// addresses in a RendezvousStore under `prefix` (one prefix per membership epoch) and connects
// a full mesh. All-to-all-v is pairwise send/recv on gloo unbound buffers (any offsets, no
// staging copy); the own block is a memcpy. Barrier is a 1-byte all-to-all; AllGather(V) and
// Broadcast use the AllToAllV defaults.
//
// Failures: gloo throws (IoException on a closed connection or a timed-out wait, EnforceNotMet
// on misuse); every throw becomes UNAVAILABLE, the connections are closed, and the
// communicator is broken for good.
//
// Thread safety: one thread at a time, as Communicator.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "parallel/communicator.h"
#include "parallel/rendezvous_store.h"

namespace sy::parallel {

struct GlooOptions {
  int rank = 0;
  int world_size = 1;
  RendezvousStore* store = nullptr;  // not owned; used only during Create
  std::string prefix = "gloo";       // rendezvous key prefix, e.g. "gloo/epoch-3"
  std::string hostname = "127.0.0.1";  // address to listen on / announce
  std::string iface;                 // when set, the interface to use instead of hostname
  std::chrono::milliseconds timeout{30000};  // rendezvous and every collective
};

// UNAVAILABLE when the rendezvous or a connection fails or times out.
absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(const GlooOptions& options);

// A CommunicatorFactory (parallel/membership.h) that connects through `store` (not owned; must
// be thread-safe and outlive the factory) with `base`'s address and time-out.
std::function<absl::StatusOr<std::unique_ptr<Communicator>>(const std::string& prefix, int rank,
                                                            int world_size)>
GlooCommunicatorFactory(const GlooOptions& base);

}  // namespace sy::parallel
