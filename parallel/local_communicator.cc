#include "parallel/local_communicator.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"

namespace sy::parallel {

class LocalCommunicator final : public OverlappingCommunicator {
 public:
  LocalCommunicator(LocalCommunicatorGroup* group, int rank) : group_(group), rank_(rank) {}

  int rank() const override { return rank_; }
  int world_size() const override { return group_->world_size_; }
  std::chrono::milliseconds timeout() const override { return group_->timeout_; }
  bool broken() const override { return group_->broken(); }
  void Abort() override { group_->Break(); }
  std::string name() const override { return "local"; }

  // Start posts the send buffer and arrives at the first barrier without waiting; Wait()
  // waits for the peers' posts, copies, and meets them at the second barrier. So a rank that
  // is ahead works while it waits for the others.
  std::unique_ptr<PendingAllToAllV> StartAllToAllV(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, void* recv, absl::Span<const int64_t> recv_counts,
      absl::Span<const int64_t> recv_offsets) override {
    auto pending = std::make_unique<Pending>(this, recv, recv_counts, recv_offsets);
    if (broken()) {
      pending->status = absl::UnavailableError("local communicator: group is broken");
      return pending;
    }
    absl::Status valid = ValidateAllToAllV(world_size(), send_counts, send_offsets, recv_counts,
                                           recv_offsets);
    if (!valid.ok()) {
      group_->Break();
      pending->status = valid;
      return pending;
    }
    group_->posted_[rank_] = {static_cast<const char*>(send), send_counts, send_offsets};
    absl::StatusOr<int64_t> gen = group_->ArriveNoWait("all-to-all-v (post)");
    if (!gen.ok()) {
      pending->status = gen.status();
    } else {
      pending->generation = *gen;
    }
    return pending;
  }

  absl::Status Barrier() override {
    if (broken()) return absl::UnavailableError("local communicator: group is broken");
    return group_->Arrive(rank_, "barrier");
  }

 private:
  class Pending final : public PendingAllToAllV {
   public:
    Pending(LocalCommunicator* comm, void* recv, absl::Span<const int64_t> recv_counts,
            absl::Span<const int64_t> recv_offsets)
        : comm_(comm), recv_(recv), recv_counts_(recv_counts), recv_offsets_(recv_offsets) {}
    ~Pending() override {
      if (!waited_) Wait().IgnoreError();
    }

    absl::Status Wait() override {
      if (waited_) return status;
      waited_ = true;
      if (!status.ok()) return status;
      LocalCommunicatorGroup* group = comm_->group_;
      const int me = comm_->rank_;
      status = group->WaitGeneration(me, generation, "all-to-all-v (post)");
      if (status.ok()) status = group->BeginRead("all-to-all-v (copy)");
      if (!status.ok()) {
        group->WaitForReaders();  // a peer may still be copying out of our send buffer
        return status;
      }
      absl::Status mismatch;
      for (int p = 0; p < group->world_size_; ++p) {
        const auto& peer = group->posted_[p];
        if (peer.send_counts[me] != recv_counts_[p]) {
          mismatch = absl::InvalidArgumentError(
              absl::StrCat("all-to-all-v: rank ", me, " expects ", recv_counts_[p],
                           " bytes from rank ", p, " which sends ", peer.send_counts[me]));
          continue;
        }
        if (recv_counts_[p] > 0)
          std::memcpy(static_cast<char*>(recv_) + recv_offsets_[p],
                      peer.send + peer.send_offsets[me], recv_counts_[p]);
      }
      group->EndRead();
      // Peers may still be reading our send buffer: wait for all before returning.
      status = group->Arrive(me, "all-to-all-v (done)");
      if (!status.ok()) {
        group->WaitForReaders();
        return status;
      }
      if (!mismatch.ok()) group->Break();
      status = mismatch;
      return status;
    }

    absl::Status status;
    int64_t generation = 0;

   private:
    LocalCommunicator* comm_;
    void* recv_;
    absl::Span<const int64_t> recv_counts_, recv_offsets_;
    bool waited_ = false;
  };

  LocalCommunicatorGroup* group_;
  int rank_;
};

LocalCommunicatorGroup::LocalCommunicatorGroup(int world_size, std::chrono::milliseconds timeout)
    : world_size_(world_size), timeout_(timeout), posted_(world_size) {
  SY_CHECK_GE(world_size, 1);
  for (int r = 0; r < world_size; ++r)
    comms_.push_back(std::make_unique<LocalCommunicator>(this, r));
}

LocalCommunicatorGroup::~LocalCommunicatorGroup() = default;

bool LocalCommunicatorGroup::broken() const {
  sy::MutexLock lock(&mu_);
  return broken_;
}

void LocalCommunicatorGroup::Break() {
  sy::MutexLock lock(&mu_);
  broken_ = true;
  cv_.SignalAll();
}

absl::Status LocalCommunicatorGroup::BeginRead(const char* what) {
  sy::MutexLock lock(&mu_);
  if (broken_) return absl::UnavailableError(absl::StrCat("local communicator: ", what,
                                                          ": group is broken"));
  ++readers_;
  return absl::OkStatus();
}

void LocalCommunicatorGroup::EndRead() {
  sy::MutexLock lock(&mu_);
  --readers_;
  cv_.SignalAll();
}

void LocalCommunicatorGroup::WaitForReaders() {
  sy::MutexLock lock(&mu_);
  while (readers_ != 0) cv_.Wait(&mu_);
}

absl::Status LocalCommunicatorGroup::Arrive(int rank, const char* what) {
  absl::StatusOr<int64_t> gen = ArriveNoWait(what);
  if (!gen.ok()) return gen.status();
  return WaitGeneration(rank, *gen, what);
}

absl::StatusOr<int64_t> LocalCommunicatorGroup::ArriveNoWait(const char* what) {
  sy::MutexLock lock(&mu_);
  if (broken_) return absl::UnavailableError(absl::StrCat("local communicator: ", what,
                                                          ": group is broken"));
  const int64_t gen = generation_;
  if (++arrived_ == world_size_) {
    arrived_ = 0;
    ++generation_;
    cv_.SignalAll();
  }
  return gen;
}

absl::Status LocalCommunicatorGroup::WaitGeneration(int rank, int64_t gen, const char* what) {
  sy::MutexLock lock(&mu_);
  if (generation_ != gen) return absl::OkStatus();
  if (broken_) return absl::UnavailableError(absl::StrCat("local communicator: ", what,
                                                          ": group is broken"));
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  while (!broken_ && generation_ == gen && !cv_.WaitUntil(&mu_, deadline)) {
  }
  if (generation_ != gen) return absl::OkStatus();
  const bool timed_out = !broken_;
  broken_ = true;
  cv_.SignalAll();
  return absl::UnavailableError(
      timed_out ? absl::StrCat("local communicator: rank ", rank, " timed out after ",
                               timeout_.count(), " ms in ", what)
                : absl::StrCat("local communicator: ", what, ": group broke while rank ", rank,
                               " waited"));
}

namespace {

// Rank r of a shared group: forwards to the group's communicator and keeps the group alive.
class SharedGroupCommunicator final : public Communicator {
 public:
  SharedGroupCommunicator(std::shared_ptr<LocalCommunicatorGroup> group, int rank)
      : group_(std::move(group)), comm_(group_->comm(rank)) {}
  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }
  std::chrono::milliseconds timeout() const override { return comm_->timeout(); }
  bool broken() const override { return comm_->broken(); }
  void Abort() override { comm_->Abort(); }
  std::string name() const override { return comm_->name(); }
  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts,
                         absl::Span<const int64_t> send_offsets, void* recv,
                         absl::Span<const int64_t> recv_counts,
                         absl::Span<const int64_t> recv_offsets) override {
    return comm_->AllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets);
  }
  std::unique_ptr<PendingAllToAllV> StartAllToAllV(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, void* recv, absl::Span<const int64_t> recv_counts,
      absl::Span<const int64_t> recv_offsets) override {
    return comm_->StartAllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets);
  }
  absl::Status Barrier() override { return comm_->Barrier(); }

 private:
  std::shared_ptr<LocalCommunicatorGroup> group_;
  Communicator* comm_;
};

}  // namespace

std::unique_ptr<Communicator> LocalRendezvous::Join(const std::string& key, int rank,
                                                    int world_size) {
  sy::MutexLock lock(&mu_);
  // Groups every rank has dropped are forgotten.
  for (auto it = groups_.begin(); it != groups_.end();)
    it = it->second.use_count() == 1 && it->first != key ? groups_.erase(it) : std::next(it);
  std::shared_ptr<LocalCommunicatorGroup>& g = groups_[key];
  if (g == nullptr || g->world_size() != world_size)
    g = std::make_shared<LocalCommunicatorGroup>(world_size, timeout_);
  return std::make_unique<SharedGroupCommunicator>(g, rank);
}

}  // namespace sy::parallel
