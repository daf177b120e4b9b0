// TcpCommunicator: ranks as processes over plain TCP sockets, the default CPU engine for
// multi-process and multi-host groups (DESIGN.md §3). GlooCommunicator does the same job on
// Gloo; this one exists because of what a step of a serving group needs: many small
// exchanges per step (three per MoE layer), each on the critical path. Gloo's TCP transport
// moves every unbound-buffer message through its device thread after a receive-ready round
// trip, and its event loop spins on a pair whose lock the caller holds; on the 2-core host an
// all-to-all of a few KB took 75 us between two processes and 4 ms between four
// (parallel/NOTES.md, transport). Here the calling thread does the I/O itself: sends are
// eager (a 16-byte header, then the bytes), receives are blocking polls on the sockets, so
// a rank waiting for a peer sleeps in the kernel and wakes once when the bytes arrive.
//
// Creation: each rank listens on `hostname` (port chosen by the OS), publishes
// "address port token" in the RendezvousStore under `prefix` (one prefix per membership
// epoch), connects to every lower rank and accepts every higher one. A connecting rank
// presents the listener's token, which it can only have read from the (authenticated)
// store; connections with a wrong token, world size or rank are closed and not counted.
//
// Wire: per message, header {uint64 sequence number of the collective, uint64 bytes}, then
// the bytes. A header that does not match what the receiver expects (another collective,
// another size) breaks the communicator: the ranks did not call the same collectives.
//
// Failures: a closed connection, a time-out or Abort() give UNAVAILABLE and break the
// communicator; breaking shuts every socket down, so the peers fail at once too.
//
// Thread safety: one thread at a time, as Communicator; Abort() and broken() from any thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "parallel/communicator.h"
#include "parallel/rendezvous_store.h"

namespace sy::parallel {

struct TcpOptions {
  int rank = 0;
  int world_size = 1;
  RendezvousStore* store = nullptr;  // not owned; used only during Create
  std::string prefix = "tcp";        // rendezvous key prefix, e.g. "tcp/epoch-3"
  std::string hostname = "127.0.0.1";  // address to listen on and announce
  std::chrono::milliseconds timeout{30000};  // rendezvous and every collective
};

// UNAVAILABLE when the rendezvous or a connection fails or times out.
absl::StatusOr<std::unique_ptr<Communicator>> CreateTcpCommunicator(const TcpOptions& options);

// A CommunicatorFactory (parallel/membership.h) that connects through `store` (not owned; must
// be thread-safe and outlive the factory) with `base`'s address and time-out.
std::function<absl::StatusOr<std::unique_ptr<Communicator>>(const std::string& prefix, int rank,
                                                            int world_size)>
TcpCommunicatorFactory(const TcpOptions& base);

}  // namespace sy::parallel
