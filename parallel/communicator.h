// Communicator: the one seam for collectives between ranks (DESIGN.md §3).
//
// The expert-parallel dispatcher (parallel/ep_dispatch.h), weight migration and the step
// protocol move bytes between ranks only through this interface. Implementations:
//   LocalCommunicator  (local_communicator.h): N ranks as threads of one process;
//   TcpCommunicator    (tcp_communicator.h):   ranks as processes over TCP sockets;
//   GlooCommunicator   (gloo_communicator.h):  ranks as processes over TCP (Gloo);
//   NcclCommunicator   (nccl_communicator.h):  GPUs (NCCL), built with SY_HAVE_CUDA;
//   FaultyCommunicator (tests/testing/faulty_communicator.h, tests only): a wrapper failing
//   or stalling the Nth call.
//
// Contract of every collective:
//   * every rank of the group calls the same collectives in the same order, also a rank with
//     nothing to send (zero counts); buffers are host memory unless a method says otherwise;
//   * sizes and offsets are in BYTES;
//   * each call finishes within timeout() or returns UNAVAILABLE; a dead peer (closed
//     connection) also gives UNAVAILABLE, never a hang;
//   * after any failure the communicator is broken(): every later call returns UNAVAILABLE at
//     once (the group must be re-formed: DESIGN.md §5 "Failure");
//   * Abort() breaks it from any thread: a collective in flight returns UNAVAILABLE soon
//     (a rank told that its group is being re-formed stops waiting for a dead peer).
//   * INVALID_ARGUMENT for malformed arguments (wrong span sizes, bad root); the group is then
//     in an unknown state and is marked broken too, since peers may be waiting on this rank.
//
// Thread safety: a communicator is used by one thread at a time (the rank's engine thread);
// broken() and Abort() may be called from any thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace sy::parallel {

// An all-to-all-v in flight (Communicator::StartAllToAllV). Wait() exactly once; destroying a
// handle that was not waited for waits (and drops the status). Until Wait() returns, the send
// and receive buffers and the count and offset spans given to Start must stay valid and
// unchanged, and the rank calls no other collective on the communicator. A handle must not
// outlive its communicator.
class PendingAllToAllV {
 public:
  virtual ~PendingAllToAllV() = default;
  // The status AllToAllV would have returned. The time-out runs from this call.
  virtual absl::Status Wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::chrono::milliseconds timeout() const = 0;
  // True once a collective failed; later collectives fail fast.
  virtual bool broken() const = 0;
  // Breaks the communicator from any thread: the collective in flight (if any) and every later
  // one return UNAVAILABLE. Idempotent.
  virtual void Abort() = 0;
  // "local", "tcp", "gloo", "nccl", or a wrapper's name.
  virtual std::string name() const = 0;

  // Fixed-size all-to-all: send holds world_size() blocks of bytes_per_rank (block p goes to
  // rank p); recv receives block p from rank p. send and recv must not overlap.
  // Default: AllToAllV with equal blocks.
  virtual absl::Status AllToAll(const void* send, void* recv, size_t bytes_per_rank);

  // Variable all-to-all: send_counts[p] bytes at send + send_offsets[p] go to rank p;
  // recv_counts[p] bytes from rank p land at recv + recv_offsets[p]. Every span has
  // world_size() entries; recv_counts[p] must equal rank p's send_counts[rank()] (exchange
  // counts first with AllToAll).
  virtual absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts,
                                 absl::Span<const int64_t> send_offsets, void* recv,
                                 absl::Span<const int64_t> recv_counts,
                                 absl::Span<const int64_t> recv_offsets) = 0;

  // AllToAllV in two halves, so the caller can work while the bytes move (DeepEP-style
  // overlap): Start posts the exchange and returns; the result lands by the handle's Wait().
  // Same arguments and contract as AllToAllV; an argument error or a broken communicator
  // comes out of Wait(). Default: runs AllToAllV at once and returns a finished handle (no
  // overlap; engines that can overlap override it).
  virtual std::unique_ptr<PendingAllToAllV> StartAllToAllV(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, void* recv, absl::Span<const int64_t> recv_counts,
      absl::Span<const int64_t> recv_offsets);

  // An all-to-all-v whose receive sizes only the senders know: send as in AllToAllV (a rank
  // may send a peer 0 bytes). recv is resized to hold what every rank sent this rank, rank p's
  // (*recv_counts)[p] bytes at (*recv_offsets)[p], back to back in rank order (the own block
  // included). Default: the counts with AllToAll, then AllToAllV; an engine whose messages
  // carry their size (tcp) does it in one exchange.
  virtual absl::Status AllToAllVDynamic(const void* send, absl::Span<const int64_t> send_counts,
                                        absl::Span<const int64_t> send_offsets,
                                        std::vector<char>* recv,
                                        std::vector<int64_t>* recv_counts,
                                        std::vector<int64_t>* recv_offsets);

  // AllToAllVDynamic in two halves, as StartAllToAllV: Start posts the exchange and returns;
  // recv, recv_counts and recv_offsets are filled by the handle's Wait(). Until then the send
  // buffer, the spans and the three outputs stay valid and the rank calls no other collective.
  // Default: the counts are posted with StartAllToAllV and Wait() exchanges the bytes with
  // AllToAllV (a peer that is late only delays Wait); tcp posts its one exchange.
  virtual std::unique_ptr<PendingAllToAllV> StartAllToAllVDynamic(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, std::vector<char>* recv,
      std::vector<int64_t>* recv_counts, std::vector<int64_t>* recv_offsets);

  // recv: [world_size() * bytes], block p from rank p.
  virtual absl::Status AllGather(const void* send, size_t bytes, void* recv);
  // Rank p contributes recv_counts[p] bytes (send holds recv_counts[rank()] bytes); recv holds
  // them back to back in rank order.
  virtual absl::Status AllGatherV(const void* send, void* recv,
                                  absl::Span<const int64_t> recv_counts);
  // buf (bytes) of `root` is copied to every rank's buf.
  virtual absl::Status Broadcast(void* buf, size_t bytes, int root);
  virtual absl::Status Barrier() = 0;
};

// The base of an engine whose exchanges are naturally started and then waited for (Gloo's
// unbound buffers, the local group's posted buffers): it implements StartAllToAllV, and
// AllToAllV is that, waited for at once.
class OverlappingCommunicator : public Communicator {
 public:
  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts,
                         absl::Span<const int64_t> send_offsets, void* recv,
                         absl::Span<const int64_t> recv_counts,
                         absl::Span<const int64_t> recv_offsets) final {
    return StartAllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets)->Wait();
  }
  std::unique_ptr<PendingAllToAllV> StartAllToAllV(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, void* recv, absl::Span<const int64_t> recv_counts,
      absl::Span<const int64_t> recv_offsets) override = 0;
};

// Checks the shape of AllToAllV arguments: spans of world_size entries, counts >= 0,
// offsets >= 0. INVALID_ARGUMENT naming the bad argument.
absl::Status ValidateAllToAllV(int world_size, absl::Span<const int64_t> send_counts,
                               absl::Span<const int64_t> send_offsets,
                               absl::Span<const int64_t> recv_counts,
                               absl::Span<const int64_t> recv_offsets);

}  // namespace sy::parallel
