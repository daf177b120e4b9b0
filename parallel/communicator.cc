#include "parallel/communicator.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"

namespace sy::parallel {

absl::Status ValidateAllToAllV(int world_size, absl::Span<const int64_t> send_counts,
                               absl::Span<const int64_t> send_offsets,
                               absl::Span<const int64_t> recv_counts,
                               absl::Span<const int64_t> recv_offsets) {
  const std::pair<const char*, absl::Span<const int64_t>> spans[] = {
      {"send_counts", send_counts},
      {"send_offsets", send_offsets},
      {"recv_counts", recv_counts},
      {"recv_offsets", recv_offsets}};
  for (const auto& [name, span] : spans) {
    if (static_cast<int>(span.size()) != world_size)
      return absl::InvalidArgumentError(
          absl::StrCat(name, " has ", span.size(), " entries, world size is ", world_size));
    for (int p = 0; p < world_size; ++p)
      if (span[p] < 0)
        return absl::InvalidArgumentError(absl::StrCat(name, "[", p, "] = ", span[p]));
  }
  return absl::OkStatus();
}

// The defaults below express the smaller collectives as one AllToAllV. That costs (n-1)
// copies of the payload for AllGather (the same as a ring) and is the simplest thing that
// keeps one code path per engine; engines with a native collective override them.

absl::Status Communicator::AllToAll(const void* send, void* recv, size_t bytes_per_rank) {
  const int n = world_size();
  const int64_t b = static_cast<int64_t>(bytes_per_rank);
  std::vector<int64_t> counts(n, b), offsets(n);
  for (int p = 0; p < n; ++p) offsets[p] = b * p;
  return AllToAllV(send, counts, offsets, recv, counts, offsets);
}

namespace {

// The default StartAllToAllV's handle: the exchange already ran.
class FinishedAllToAllV final : public PendingAllToAllV {
 public:
  explicit FinishedAllToAllV(absl::Status status) : status_(std::move(status)) {}
  absl::Status Wait() override { return status_; }

 private:
  absl::Status status_;
};

// The second half of AllToAllVDynamic: with the byte counts each peer sends known, the
// receive layout (packed in rank order) and the exchange of the bytes.
absl::Status ExchangeWithKnownCounts(Communicator* comm, const void* send,
                                     absl::Span<const int64_t> send_counts,
                                     absl::Span<const int64_t> send_offsets,
                                     std::vector<char>* recv,
                                     const std::vector<int64_t>& recv_counts,
                                     std::vector<int64_t>* recv_offsets) {
  const int n = comm->world_size();
  recv_offsets->assign(n, 0);
  int64_t total = 0;
  for (int p = 0; p < n; ++p) {
    if (recv_counts[p] < 0)
      return absl::InternalError(
          absl::StrCat("AllToAllVDynamic: rank ", p, " sends ", recv_counts[p], " bytes"));
    (*recv_offsets)[p] = total;
    total += recv_counts[p];
  }
  recv->resize(std::max<int64_t>(total, 1));
  return comm->AllToAllV(send, send_counts, send_offsets, recv->data(), recv_counts,
                         *recv_offsets);
}

// The default StartAllToAllVDynamic's handle: the counts are in flight; Wait() takes them
// and exchanges the bytes.
class DynamicAllToAllV final : public PendingAllToAllV {
 public:
  DynamicAllToAllV(Communicator* comm, const void* send, absl::Span<const int64_t> send_counts,
                   absl::Span<const int64_t> send_offsets, std::vector<char>* recv,
                   std::vector<int64_t>* recv_counts, std::vector<int64_t>* recv_offsets)
      : comm_(comm),
        send_(send),
        send_counts_(send_counts.begin(), send_counts.end()),
        send_offsets_(send_offsets.begin(), send_offsets.end()),
        recv_(recv),
        recv_counts_(recv_counts),
        recv_offsets_(recv_offsets) {
    const int n = comm_->world_size();
    if (static_cast<int>(send_counts_.size()) != n ||
        static_cast<int>(send_offsets_.size()) != n) {
      status_ = absl::InvalidArgumentError(absl::StrCat(
          "AllToAllVDynamic: send spans have ", send_counts_.size(), " and ",
          send_offsets_.size(), " entries, world size ", n));
      return;
    }
    counts_in_.assign(n, 0);
    count_bytes_.assign(n, sizeof(int64_t));
    count_offsets_.resize(n);
    for (int p = 0; p < n; ++p) count_offsets_[p] = static_cast<int64_t>(sizeof(int64_t)) * p;
    counts_ = comm_->StartAllToAllV(send_counts_.data(), count_bytes_, count_offsets_,
                                    counts_in_.data(), count_bytes_, count_offsets_);
  }
  ~DynamicAllToAllV() override {
    if (!waited_) Wait().IgnoreError();
  }

  absl::Status Wait() override {
    if (waited_) return status_;
    waited_ = true;
    if (!status_.ok()) return status_;
    status_ = counts_->Wait();
    if (!status_.ok()) return status_;
    recv_counts_->assign(counts_in_.begin(), counts_in_.end());
    status_ = ExchangeWithKnownCounts(comm_, send_, send_counts_, send_offsets_, recv_,
                                      *recv_counts_, recv_offsets_);
    return status_;
  }

 private:
  Communicator* comm_;
  const void* send_;
  std::vector<int64_t> send_counts_, send_offsets_, counts_in_;
  std::vector<int64_t> count_bytes_, count_offsets_;  // the counts exchange's spans
  std::vector<char>* recv_;
  std::vector<int64_t>* recv_counts_;
  std::vector<int64_t>* recv_offsets_;
  std::unique_ptr<PendingAllToAllV> counts_;
  absl::Status status_;
  bool waited_ = false;
};

}  // namespace

std::unique_ptr<PendingAllToAllV> Communicator::StartAllToAllVDynamic(
    const void* send, absl::Span<const int64_t> send_counts,
    absl::Span<const int64_t> send_offsets, std::vector<char>* recv,
    std::vector<int64_t>* recv_counts, std::vector<int64_t>* recv_offsets) {
  return std::make_unique<DynamicAllToAllV>(this, send, send_counts, send_offsets, recv,
                                            recv_counts, recv_offsets);
}

std::unique_ptr<PendingAllToAllV> Communicator::StartAllToAllV(
    const void* send, absl::Span<const int64_t> send_counts,
    absl::Span<const int64_t> send_offsets, void* recv, absl::Span<const int64_t> recv_counts,
    absl::Span<const int64_t> recv_offsets) {
  return std::make_unique<FinishedAllToAllV>(
      AllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets));
}

absl::Status Communicator::AllToAllVDynamic(const void* send, absl::Span<const int64_t> send_counts,
                                            absl::Span<const int64_t> send_offsets,
                                            std::vector<char>* recv,
                                            std::vector<int64_t>* recv_counts,
                                            std::vector<int64_t>* recv_offsets) {
  const int n = world_size();
  if (static_cast<int>(send_counts.size()) != n)
    return absl::InvalidArgumentError(absl::StrCat("AllToAllVDynamic: send_counts has ",
                                                   send_counts.size(), " entries, world size ", n));
  recv_counts->assign(n, 0);
  SY_RETURN_IF_ERROR(AllToAll(send_counts.data(), recv_counts->data(), sizeof(int64_t)));
  return ExchangeWithKnownCounts(this, send, send_counts, send_offsets, recv, *recv_counts,
                                 recv_offsets);
}

absl::Status Communicator::AllGather(const void* send, size_t bytes, void* recv) {
  const int n = world_size();
  std::vector<int64_t> send_counts(n, static_cast<int64_t>(bytes)), send_offsets(n, 0),
      recv_counts(n, static_cast<int64_t>(bytes)), recv_offsets(n);
  for (int p = 0; p < n; ++p) recv_offsets[p] = static_cast<int64_t>(bytes) * p;
  return AllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets);
}

absl::Status Communicator::AllGatherV(const void* send, void* recv,
                                      absl::Span<const int64_t> recv_counts) {
  const int n = world_size();
  if (static_cast<int>(recv_counts.size()) != n)
    return absl::InvalidArgumentError(
        absl::StrCat("AllGatherV: recv_counts has ", recv_counts.size(), " entries, world size ",
                     n));
  std::vector<int64_t> send_counts(n, recv_counts[rank()]), send_offsets(n, 0),
      recv_offsets(n, 0);
  for (int p = 1; p < n; ++p) recv_offsets[p] = recv_offsets[p - 1] + recv_counts[p - 1];
  return AllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets);
}

absl::Status Communicator::Broadcast(void* buf, size_t bytes, int root) {
  const int n = world_size();
  if (root < 0 || root >= n)
    return absl::InvalidArgumentError(absl::StrCat("Broadcast: root ", root, " of ", n));
  const bool is_root = rank() == root;
  std::vector<int64_t> send_counts(n, is_root ? static_cast<int64_t>(bytes) : 0),
      zeros(n, 0), recv_counts(n, 0);
  send_counts[rank()] = 0;  // the root keeps its own bytes in place
  if (!is_root) recv_counts[root] = static_cast<int64_t>(bytes);
  return AllToAllV(buf, send_counts, zeros, buf, recv_counts, zeros);
}

}  // namespace sy::parallel
