#include "tests/testing/faulty_communicator.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"

namespace sy::parallel {

absl::Status FaultyCommunicator::Step(const char* what) {
  if (failed_)
    return absl::UnavailableError(absl::StrCat("faulty communicator: broken before ", what));
  const int64_t call = calls_++;
  if (call != options_.fault_call) return absl::OkStatus();
  if (options_.fault == Fault::kFail) {
    failed_ = true;
    return absl::UnavailableError(
        absl::StrCat("faulty communicator: injected failure at call ", call, " (", what, ")"));
  }
  std::this_thread::sleep_for(options_.stall);
  return absl::OkStatus();
}

absl::Status FaultyCommunicator::AllToAll(const void* send, void* recv, size_t bytes_per_rank) {
  SY_RETURN_IF_ERROR(Step("all-to-all"));
  return base_->AllToAll(send, recv, bytes_per_rank);
}

absl::Status FaultyCommunicator::AllToAllV(const void* send,
                                           absl::Span<const int64_t> send_counts,
                                           absl::Span<const int64_t> send_offsets, void* recv,
                                           absl::Span<const int64_t> recv_counts,
                                           absl::Span<const int64_t> recv_offsets) {
  SY_RETURN_IF_ERROR(Step("all-to-all-v"));
  return base_->AllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets);
}

absl::Status FaultyCommunicator::Barrier() {
  SY_RETURN_IF_ERROR(Step("barrier"));
  return base_->Barrier();
}

}  // namespace sy::parallel
