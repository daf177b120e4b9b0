// LocalCommunicator: N ranks as threads of one process sharing memory (DESIGN.md §3). Used by
// multi-rank tests, the dispatch benchmark and single-process multi-rank runs.
//
// A LocalCommunicatorGroup owns the N rank communicators; thread r uses comm(r). Collectives
// are "pull" copies: each rank posts its send buffer and layout, all ranks meet at a barrier,
// each copies what it receives straight out of the peers' send buffers, and a second barrier
// keeps the send buffers alive until every peer has read them. So an all-to-all-v costs one
// memcpy per byte, the floor for shared memory.
//
// Every wait has the group's timeout; a rank that does not arrive in time breaks the group and
// all waiting ranks return UNAVAILABLE (as a dead peer would over a network).
//
// Thread safety: one thread per rank communicator; the group's methods are thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "kernels/core/mutex.h"
#include "parallel/communicator.h"

namespace sy::parallel {

class LocalCommunicatorGroup {
 public:
  LocalCommunicatorGroup(int world_size, std::chrono::milliseconds timeout);
  ~LocalCommunicatorGroup();
  LocalCommunicatorGroup(const LocalCommunicatorGroup&) = delete;
  LocalCommunicatorGroup& operator=(const LocalCommunicatorGroup&) = delete;

  int world_size() const { return world_size_; }
  // The communicator of rank r, owned by the group.
  Communicator* comm(int r) const { return comms_[r].get(); }
  bool broken() const;

  // Breaks the group as a failed peer would; waiting and later calls on every rank return
  // UNAVAILABLE. Any thread.
  void Break();

 private:
  friend class LocalCommunicator;
  struct Posted {
    const char* send = nullptr;
    absl::Span<const int64_t> send_counts, send_offsets;
  };

  // Waits until all ranks have arrived (generation barrier) or the deadline passes.
  absl::Status Arrive(int rank, const char* what);
  // Arrive in two halves: counts this rank in and returns the barrier's generation ...
  absl::StatusOr<int64_t> ArriveNoWait(const char* what);
  // ... then waits (up to the timeout, from this call) until that generation has passed.
  absl::Status WaitGeneration(int rank, int64_t gen, const char* what);
  // A rank copies out of its peers' posted send buffers between BeginRead and EndRead
  // (BeginRead fails once the group broke). A rank that leaves a collective early because the
  // group broke first waits until no peer reads: its send buffer is about to go.
  absl::Status BeginRead(const char* what);
  void EndRead();
  void WaitForReaders();

  const int world_size_;
  const std::chrono::milliseconds timeout_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::vector<Posted> posted_;  // [world_size]; slot r written by rank r between barriers

  mutable sy::Mutex mu_;
  sy::CondVar cv_;
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int readers_ ABSL_GUARDED_BY(mu_) = 0;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
};

// LocalRendezvous: where ranks that are threads of one process meet for each membership epoch
// (the in-process counterpart of a rendezvous store): the ranks that Join the same key (an
// epoch's prefix) get the communicators of one LocalCommunicatorGroup, made by the first. Each
// returned communicator keeps its group alive. Thread-safe.
class LocalRendezvous {
 public:
  explicit LocalRendezvous(std::chrono::milliseconds timeout) : timeout_(timeout) {}
  std::unique_ptr<Communicator> Join(const std::string& key, int rank, int world_size);

 private:
  const std::chrono::milliseconds timeout_;
  sy::Mutex mu_;
  std::map<std::string, std::shared_ptr<LocalCommunicatorGroup>> groups_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sy::parallel
