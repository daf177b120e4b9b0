#include "parallel/nccl_communicator.h"

#include "absl/strings/str_cat.h"

#ifdef SY_HAVE_CUDA

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "kernels/core/logging.h"
#include "kernels/core/status.h"

namespace sy::parallel {
namespace {

using Clock = std::chrono::steady_clock;

absl::Status CudaError(cudaError_t e, absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

// Polls ncclCommGetAsyncError until the communicator is no longer in progress or the deadline
// passes. DEADLINE: UNAVAILABLE "timed out"; NCCL error: UNAVAILABLE with NCCL's message.
absl::Status WaitComm(ncclComm_t comm, Clock::time_point deadline, absl::string_view what) {
  auto pause = std::chrono::microseconds(20);
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) state = r;
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress)
      return absl::UnavailableError(absl::StrCat("nccl ", what, ": ", ncclGetErrorString(state),
                                                 " (", ncclGetLastError(comm), ")"));
    if (Clock::now() >= deadline)
      return absl::UnavailableError(absl::StrCat("nccl ", what, ": timed out"));
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

class NcclCommunicatorImpl final : public NcclCommunicator {
 public:
  NcclCommunicatorImpl(const NcclOptions& o, ncclComm_t comm, cudaStream_t stream,
                       cudaEvent_t done)
      : rank_(o.rank),
        world_size_(o.world_size),
        device_(o.device),
        timeout_(o.timeout),
        comm_(comm),
        stream_(stream),
        done_(done) {}

  ~NcclCommunicatorImpl() override {
    cudaSetDevice(device_);
    if (!broken_) {
      // Finalize flushes outstanding work; a failure there falls back to abort.
      ncclResult_t r = ncclCommFinalize(comm_);
      if ((r == ncclSuccess || r == ncclInProgress) &&
          WaitComm(comm_, Clock::now() + timeout_, "finalize").ok()) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    } else if (!aborted_) {
      ncclCommAbort(comm_);
    }
    cudaEventDestroy(done_);
    cudaStreamDestroy(stream_);
    if (d_send_) cudaFree(d_send_);
    if (d_recv_) cudaFree(d_recv_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  bool broken() const override { return broken_; }
  // The owning thread polls for it while it waits (WaitStream) and aborts the communicator
  // there: ncclCommAbort is not called from a second thread while the first uses the comm.
  void Abort() override { abort_requested_ = true; }
  std::string name() const override { return "nccl"; }
  void* stream() const override { return stream_; }

  absl::Status AllToAllV(const void* send, absl::Span<const int64_t> send_counts,
                         absl::Span<const int64_t> send_offsets, void* recv,
                         absl::Span<const int64_t> recv_counts,
                         absl::Span<const int64_t> recv_offsets) override {
    if (abort_requested_ && !broken_) return Break(absl::UnavailableError("nccl communicator aborted"));
    if (broken_) return absl::UnavailableError("nccl communicator is broken");
    absl::Status valid =
        ValidateAllToAllV(world_size_, send_counts, send_offsets, recv_counts, recv_offsets);
    if (!valid.ok()) return Break(valid);
    int64_t send_extent = 0, recv_extent = 0;
    for (int p = 0; p < world_size_; ++p) {
      if (send_counts[p] > 0)
        send_extent = std::max(send_extent, send_offsets[p] + send_counts[p]);
      if (recv_counts[p] > 0)
        recv_extent = std::max(recv_extent, recv_offsets[p] + recv_counts[p]);
    }
    cudaSetDevice(device_);
    SY_RETURN_IF_ERROR(Reserve(&d_send_, &send_cap_, send_extent));
    SY_RETURN_IF_ERROR(Reserve(&d_recv_, &recv_cap_, recv_extent));
    // Only the bytes that travel are staged; gaps stay untouched on both sides.
    for (int p = 0; p < world_size_; ++p)
      if (send_counts[p] > 0)
        SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(
            static_cast<char*>(d_send_) + send_offsets[p],
            static_cast<const char*>(send) + send_offsets[p], send_counts[p],
            cudaMemcpyHostToDevice, stream_), "staging send"));
    SY_RETURN_IF_ERROR(AllToAllVDevice(d_send_, send_counts, send_offsets, d_recv_, recv_counts,
                                       recv_offsets));
    for (int p = 0; p < world_size_; ++p)
      if (recv_counts[p] > 0)
        SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(
            static_cast<char*>(recv) + recv_offsets[p],
            static_cast<const char*>(d_recv_) + recv_offsets[p], recv_counts[p],
            cudaMemcpyDeviceToHost, stream_), "staging recv"));
    return WaitStream(Clock::now() + timeout_, "all-to-all-v (copy back)");
  }

  absl::Status AllToAllVDevice(const void* send, absl::Span<const int64_t> send_counts,
                               absl::Span<const int64_t> send_offsets, void* recv,
                               absl::Span<const int64_t> recv_counts,
                               absl::Span<const int64_t> recv_offsets) override {
    if (abort_requested_ && !broken_) return Break(absl::UnavailableError("nccl communicator aborted"));
    if (broken_) return absl::UnavailableError("nccl communicator is broken");
    absl::Status valid =
        ValidateAllToAllV(world_size_, send_counts, send_offsets, recv_counts, recv_offsets);
    if (!valid.ok()) return Break(valid);
    if (send_counts[rank_] != recv_counts[rank_])
      return Break(absl::InvalidArgumentError(
          absl::StrCat("nccl all-to-all-v: rank ", rank_, " sends itself ", send_counts[rank_],
                       " bytes but expects ", recv_counts[rank_])));
    cudaSetDevice(device_);
    const auto deadline = Clock::now() + timeout_;
    if (send_counts[rank_] > 0)
      SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(static_cast<char*>(recv) + recv_offsets[rank_],
                                              static_cast<const char*>(send) +
                                                  send_offsets[rank_],
                                              send_counts[rank_], cudaMemcpyDeviceToDevice,
                                              stream_),
                              "self copy"));
    ncclResult_t r = ncclGroupStart();
    for (int p = 0; p < world_size_ && (r == ncclSuccess || r == ncclInProgress); ++p) {
      if (p == rank_) continue;
      if (send_counts[p] > 0)
        r = ncclSend(static_cast<const char*>(send) + send_offsets[p], send_counts[p], ncclUint8,
                     p, comm_, stream_);
      if ((r == ncclSuccess || r == ncclInProgress) && recv_counts[p] > 0)
        r = ncclRecv(static_cast<char*>(recv) + recv_offsets[p], recv_counts[p], ncclUint8, p,
                     comm_, stream_);
    }
    ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = end;
    if (r != ncclSuccess && r != ncclInProgress)
      return Break(absl::UnavailableError(
          absl::StrCat("nccl all-to-all-v: ", ncclGetErrorString(r))));
    // Non-blocking communicator: the group may still be enqueuing.
    absl::Status s = WaitComm(comm_, deadline, "all-to-all-v (enqueue)");
    if (!s.ok()) return Break(s);
    return WaitStream(deadline, "all-to-all-v");
  }

  absl::Status Barrier() override {
    std::vector<char> send(world_size_, 1), recv(world_size_, 0);
    return AllToAll(send.data(), recv.data(), 1);
  }

 private:
  absl::Status Cuda(cudaError_t e, absl::string_view what) {
    if (e == cudaSuccess) return absl::OkStatus();
    return Break(absl::UnavailableError(absl::StrCat("nccl communicator: ", what, ": ",
                                                     cudaGetErrorString(e))));
  }

  absl::Status Reserve(void** buf, int64_t* cap, int64_t bytes) {
    if (bytes <= *cap) return absl::OkStatus();
    if (*buf) cudaFree(*buf);
    *buf = nullptr;
    *cap = 0;
    const int64_t want = std::max<int64_t>(bytes, 1 << 20);
    SY_RETURN_IF_ERROR(Cuda(cudaMalloc(buf, want), "staging buffer"));
    *cap = want;
    return absl::OkStatus();
  }

  // Waits for the stream's work so far, watching NCCL's async error, until the deadline.
  absl::Status WaitStream(Clock::time_point deadline, absl::string_view what) {
    SY_RETURN_IF_ERROR(Cuda(cudaEventRecord(done_, stream_), "event record"));
    auto pause = std::chrono::microseconds(5);
    while (true) {
      cudaError_t e = cudaEventQuery(done_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return Cuda(e, what);
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state != ncclSuccess && state != ncclInProgress)
        return Break(absl::UnavailableError(
            absl::StrCat("nccl ", what, ": ", ncclGetErrorString(state))));
      if (Clock::now() >= deadline)
        return Break(absl::UnavailableError(
            absl::StrCat("nccl ", what, ": timed out after ", timeout_.count(), " ms")));
      if (abort_requested_)
        return Break(absl::UnavailableError(absl::StrCat("nccl ", what, ": aborted")));
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(500));
    }
  }

  // Marks the communicator broken and aborts it: NCCL kernels waiting on a dead peer would
  // otherwise spin forever and block the stream.
  absl::Status Break(absl::Status status) {
    if (!broken_) {
      broken_ = true;
      ncclCommAbort(comm_);
      aborted_ = true;
    }
    return status;
  }

  const int rank_, world_size_, device_;
  const std::chrono::milliseconds timeout_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  cudaEvent_t done_;
  std::atomic<bool> broken_{false};
  std::atomic<bool> abort_requested_{false};
  bool aborted_ = false;
  void* d_send_ = nullptr;
  void* d_recv_ = nullptr;
  int64_t send_cap_ = 0, recv_cap_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateNcclCommunicator(
    const NcclOptions& o) {
  if (o.store == nullptr) return absl::InvalidArgumentError("nccl: no rendezvous store");
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size)
    return absl::InvalidArgumentError(
        absl::StrCat("nccl: rank ", o.rank, " of world size ", o.world_size));
  const auto deadline = Clock::now() + o.timeout;
  cudaError_t ce = cudaSetDevice(o.device);
  if (ce != cudaSuccess) return CudaError(ce, absl::StrCat("nccl: cudaSetDevice(", o.device, ")"));

  const std::string key = absl::StrCat(o.prefix, "/unique_id");
  ncclUniqueId id;
  if (o.rank == 0) {
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess)
      return absl::UnavailableError(absl::StrCat("nccl: ncclGetUniqueId: ", ncclGetErrorString(r)));
    SY_RETURN_IF_ERROR(sy::Annotate(
        o.store->Set(key, std::string(reinterpret_cast<const char*>(&id), sizeof(id))),
        "nccl: publishing the unique id"));
  } else {
    absl::StatusOr<std::string> v = o.store->Get(key, o.timeout);
    if (!v.ok())
      return absl::UnavailableError(absl::StrCat("nccl: waiting for the unique id: ",
                                                 v.status().message()));
    if (v->size() != sizeof(id))
      return absl::UnavailableError(absl::StrCat("nccl: unique id of ", v->size(), " bytes"));
    std::memcpy(&id, v->data(), sizeof(id));
  }

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, o.world_size, id, o.rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (comm) ncclCommAbort(comm);
    return absl::UnavailableError(
        absl::StrCat("nccl: ncclCommInitRankConfig: ", ncclGetErrorString(r)));
  }
  absl::Status s = WaitComm(comm, deadline, "init");
  if (!s.ok()) {
    ncclCommAbort(comm);
    return sy::Annotate(s, absl::StrCat("rank ", o.rank, " of ", o.world_size));
  }
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  ce = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
  if (ce != cudaSuccess) {
    ncclCommAbort(comm);
    return CudaError(ce, "nccl: stream");
  }
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicatorImpl(o, comm, stream, done));
}

}  // namespace sy::parallel

#else  // !SY_HAVE_CUDA

namespace sy::parallel {

absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateNcclCommunicator(const NcclOptions&) {
  return absl::UnimplementedError("nccl: this build has no CUDA (configure with SY_ENABLE_CUDA=ON)");
}

}  // namespace sy::parallel

#endif  // SY_HAVE_CUDA
