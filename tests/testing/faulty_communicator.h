// FaultyCommunicator: wraps a real Communicator and fails or stalls its Nth collective, as
// leveldb's ErrorEnv wraps Env. Tests use it to prove that a failing or stuck rank turns into
// UNAVAILABLE on every rank within the timeout, never a hang.
//
// Calls are counted across all collectives (AllToAll, AllToAllV, Barrier, and the default
// AllGather/Broadcast, which reach the wrapped AllToAllV), starting at 0. On the faulty call:
//   kFail:  returns UNAVAILABLE without calling the wrapped communicator (this rank "dies";
//           its peers wait for it until their timeout) and every later call fails too;
//   kStall: sleeps `stall` before calling the wrapped communicator (a slow or stuck rank).
//
// Thread safety: as Communicator (one thread at a time).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "parallel/communicator.h"

namespace sy::parallel {

class FaultyCommunicator final : public Communicator {
 public:
  enum class Fault { kFail, kStall };
  struct Options {
    int64_t fault_call = 0;  // index of the faulty call
    Fault fault = Fault::kFail;
    std::chrono::milliseconds stall{0};
  };

  // base is not owned and must outlive this wrapper.
  FaultyCommunicator(Communicator* base, Options options) : base_(base), options_(options) {}

  int rank() const override { return base_->rank(); }
  int world_size() const override { return base_->world_size(); }
  std::chrono::milliseconds timeout() const override { return base_->timeout(); }
  bool broken() const override { return failed_ || base_->broken(); }
  void Abort() override { base_->Abort(); }
  std::string name() const override { return "faulty(" + base_->name() + ")"; }
  int64_t calls() const { return calls_; }

  absl::Status AllToAll(const void* send, void* recv, size_t bytes_per_rank) override;
  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts,
                         absl::Span<const int64_t> send_offsets, void* recv,
                         absl::Span<const int64_t> recv_counts,
                         absl::Span<const int64_t> recv_offsets) override;
  absl::Status Barrier() override;

 private:
  // OK to go on to the wrapped call, or the injected failure.
  absl::Status Step(const char* what);

  Communicator* base_;
  Options options_;
  int64_t calls_ = 0;
  std::atomic<bool> failed_{false};
};

}  // namespace sy::parallel
