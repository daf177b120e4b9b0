// NcclCommunicator: ranks as GPUs over NCCL 2.28 from the CUDA install (DESIGN.md §3).
//
// Creation: rank 0 makes the NCCL unique id and publishes it in the RendezvousStore under
// `prefix` (one prefix per membership epoch; in a served cluster the leader's Cluster service is
// the store); every rank starts a NON-BLOCKING ncclCommInitRankConfig and polls
// ncclCommGetAsyncError until it finishes or the timeout passes (then ncclCommAbort →
// UNAVAILABLE), so a missing peer never hangs the process.
//
// All-to-all-v is one NCCL group of ncclSend/ncclRecv per peer (as nccl-tests alltoall.cu),
// the own block a device-to-device copy, on the communicator's stream; completion is polled
// (cudaEventQuery + ncclCommGetAsyncError) against the timeout, and a failure or time-out
// aborts the communicator (ncclCommAbort), which is then broken. The Communicator methods take
// HOST pointers and stage through device buffers owned by the communicator; the *Device
// methods take pointers on this rank's GPU and skip the staging.
//
// Built only with SY_HAVE_CUDA (CMake SY_ENABLE_CUDA); without it CreateNcclCommunicator
// returns UNIMPLEMENTED.
//
// Thread safety: one thread at a time, as Communicator.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "parallel/communicator.h"
#include "parallel/rendezvous_store.h"

namespace sy::parallel {

struct NcclOptions {
  int rank = 0;
  int world_size = 1;
  RendezvousStore* store = nullptr;  // not owned; used only during creation
  std::string prefix = "nccl";       // key prefix for the unique id, e.g. "nccl/epoch-3"
  int device = 0;                    // CUDA device ordinal of this rank
  std::chrono::milliseconds timeout{30000};  // init and every collective
};

class NcclCommunicator : public Communicator {
 public:
  // As AllToAllV, with send and recv in this rank's device memory.
  virtual absl::Status AllToAllVDevice(const void* send, absl::Span<const int64_t> send_counts,
                                       absl::Span<const int64_t> send_offsets, void* recv,
                                       absl::Span<const int64_t> recv_counts,
                                       absl::Span<const int64_t> recv_offsets) = 0;
  // The cudaStream_t the collectives run on (as void*, so this header needs no CUDA).
  virtual void* stream() const = 0;
};

// UNAVAILABLE when the rendezvous or the NCCL init fails or times out; UNIMPLEMENTED in a
// build without CUDA; FAILED_PRECONDITION when the CUDA device cannot be used.
absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateNcclCommunicator(
    const NcclOptions& options);

}  // namespace sy::parallel
