#include "parallel/local_communicator.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"

namespace sy::parallel {

class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator(LocalCommunicatorGroup* group, int rank) : group_(group), rank_(rank) {}

  int rank() const override { return rank_; }
  int world_size() const override { return group_->world_size_; }
  std::chrono::milliseconds timeout() const override { return group_->timeout_; }
  bool broken() const override { return group_->broken(); }
  std::string name() const override { return "local"; }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts,
                         absl::Span<const int64_t> send_offsets, void* recv,
                         absl::Span<const int64_t> recv_counts,
                         absl::Span<const int64_t> recv_offsets) override {
    if (broken()) return absl::UnavailableError("local communicator: group is broken");
    absl::Status valid = ValidateAllToAllV(world_size(), send_counts, send_offsets, recv_counts,
                                           recv_offsets);
    if (!valid.ok()) {
      group_->TEST_Break();
      return valid;
    }
    group_->posted_[rank_] = {static_cast<const char*>(send), send_counts, send_offsets};
    SY_RETURN_IF_ERROR(group_->Arrive(rank_, "all-to-all-v (post)"));
    absl::Status mismatch;
    for (int p = 0; p < world_size(); ++p) {
      const auto& peer = group_->posted_[p];
      if (peer.send_counts[rank_] != recv_counts[p]) {
        mismatch = absl::InvalidArgumentError(
            absl::StrCat("all-to-all-v: rank ", rank_, " expects ", recv_counts[p],
                         " bytes from rank ", p, " which sends ", peer.send_counts[rank_]));
        continue;
      }
      if (recv_counts[p] > 0)
        std::memcpy(static_cast<char*>(recv) + recv_offsets[p],
                    peer.send + peer.send_offsets[rank_], recv_counts[p]);
    }
    // Peers may still be reading our send buffer: wait for all before returning.
    SY_RETURN_IF_ERROR(group_->Arrive(rank_, "all-to-all-v (done)"));
    if (!mismatch.ok()) group_->TEST_Break();
    return mismatch;
  }

  absl::Status Barrier() override {
    if (broken()) return absl::UnavailableError("local communicator: group is broken");
    return group_->Arrive(rank_, "barrier");
  }

 private:
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
  std::lock_guard<std::mutex> lock(mu_);
  return broken_;
}

void LocalCommunicatorGroup::TEST_Break() {
  std::lock_guard<std::mutex> lock(mu_);
  broken_ = true;
  cv_.notify_all();
}

absl::Status LocalCommunicatorGroup::Arrive(int rank, const char* what) {
  std::unique_lock<std::mutex> lock(mu_);
  if (broken_) return absl::UnavailableError(absl::StrCat("local communicator: ", what,
                                                          ": group is broken"));
  const int64_t gen = generation_;
  if (++arrived_ == world_size_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return absl::OkStatus();
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  cv_.wait_until(lock, deadline, [&] { return broken_ || generation_ != gen; });
  if (generation_ != gen) return absl::OkStatus();
  const bool timed_out = !broken_;
  broken_ = true;
  cv_.notify_all();
  return absl::UnavailableError(
      timed_out ? absl::StrCat("local communicator: rank ", rank, " timed out after ",
                               timeout_.count(), " ms in ", what)
                : absl::StrCat("local communicator: ", what, ": group broke while rank ", rank,
                               " waited"));
}

}  // namespace sy::parallel
