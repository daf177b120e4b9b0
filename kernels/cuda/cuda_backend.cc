#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/core/dtype.h"
#include "kernels/core/status.h"
#include "kernels/cpu/fast_backend.h"
#include "kernels/cpu/row_kernels.h"
#include "kernels/cuda/cuda_kernels.h"

namespace sy::kernels::cuda {
namespace {

absl::Status Cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clear a sticky-free error so that the next call starts clean
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(err), " (",
                                          cudaGetErrorString(err), ")"));
}

// A device allocation that only grows (scratch reused across calls).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  absl::Status Reserve(int64_t bytes, const char* what) {
    if (bytes <= capacity_) return absl::OkStatus();
    const int64_t want = std::max<int64_t>(bytes, 2 * capacity_);
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    capacity_ = 0;
    const cudaError_t err = cudaMalloc(&ptr_, static_cast<size_t>(want));
    if (err != cudaSuccess) {
      cudaGetLastError();
      ptr_ = nullptr;
      size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s: %d bytes of device scratch do not fit (%.1f MiB free of %.1f MiB)", what, want,
          free_bytes / 1048576.0, total / 1048576.0));
    }
    capacity_ = want;
    return absl::OkStatus();
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  int64_t capacity_ = 0;
};

// Rows of w as dense bf16 [rows, cols] (the checkpoint's row stride dropped).
void ToBf16Rows(const WeightView& w, std::vector<uint16_t>* out) {
  out->resize(static_cast<size_t>(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    uint16_t* dst = out->data() + r * w.cols;
    const uint8_t* src = w.row(r);
    switch (w.dtype) {
      case DType::kBF16:
        std::memcpy(dst, src, static_cast<size_t>(w.cols) * 2);
        break;
      case DType::kF32:
        cpu::RowToBf16(reinterpret_cast<const float*>(src), w.cols, dst);
        break;
      case DType::kF16:
        for (int64_t c = 0; c < w.cols; ++c) {
          uint16_t h;
          std::memcpy(&h, src + 2 * c, 2);
          dst[c] = F32ToBf16(F16ToF32(h));
        }
        break;
    }
  }
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t stream, std::unique_ptr<GemmContext> gemm,
              std::unique_ptr<Backend> cpu)
      : device_(device), stream_(stream), gemm_(std::move(gemm)), cpu_(std::move(cpu)) {}

  ~CudaBackend() override {
    cudaSetDevice(device_);
    for (auto& [key, ptr] : weights_) cudaFree(ptr);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::string name() const override {
    return absl::StrCat("cuda:", device_, " (", gemm_->name(), "; ", cpu_->name(), " for the rest)");
  }

  absl::Status MatMul(const float* x, int64_t num_tokens, const WeightView& w, float* y,
                      const float* bias) override {
    if (num_tokens <= 0) return absl::OkStatus();
    SY_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    SY_ASSIGN_OR_RETURN(const void* w_dev, Upload(w));
    const int64_t n = w.rows, k = w.cols;
    SY_ASSIGN_OR_RETURN(const void* x_dev, ToDevice(x, num_tokens, k));
    SY_RETURN_IF_ERROR(y_dev_.Reserve(num_tokens * n * 4, "matmul output"));
    SY_RETURN_IF_ERROR(gemm_->Gemm(x_dev, w_dev, num_tokens, n, k, y_dev_.get(), DType::kF32, stream_));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(y, y_dev_.get(), static_cast<size_t>(num_tokens * n * 4),
                                            cudaMemcpyDeviceToHost, stream_),
                            "copying a product to the host"));
    SY_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "matmul"));
    if (bias != nullptr)
      for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t j = 0; j < n; ++j) y[t * n + j] += bias[j];
    return absl::OkStatus();
  }

  absl::Status GroupedExpertFfn(const float* x, const int64_t* offsets, int64_t num_groups,
                                const ExpertWeights* const* experts, int64_t hidden,
                                float* y) override {
    const int64_t first = offsets[0], rows = offsets[num_groups] - first;
    if (rows <= 0) return absl::OkStatus();
    SY_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    int64_t inter = -1;
    ffn_weights_.assign(num_groups, ExpertFfnWeights{});
    offsets32_.resize(num_groups + 1);
    for (int64_t g = 0; g < num_groups; ++g) {
      offsets32_[g] = static_cast<int32_t>(offsets[g] - first);
      if (offsets[g + 1] == offsets[g]) continue;
      const ExpertWeights* e = experts[g];
      if (e == nullptr)
        return absl::InvalidArgumentError(absl::StrCat("expert group ", g, " has rows but no weights"));
      if (inter < 0) inter = e->w1.rows;
      if (e->w1.rows != inter || e->w3.rows != inter || e->w2.cols != inter ||
          e->w1.cols != hidden || e->w3.cols != hidden || e->w2.rows != hidden)
        return absl::InvalidArgumentError(absl::StrCat("expert group ", g, ": weight shapes do not match hidden ",
                                                       hidden, " and intermediate ", inter));
      SY_ASSIGN_OR_RETURN(ffn_weights_[g].w1, Upload(e->w1));
      SY_ASSIGN_OR_RETURN(ffn_weights_[g].w3, Upload(e->w3));
      SY_ASSIGN_OR_RETURN(ffn_weights_[g].w2, Upload(e->w2));
    }
    offsets32_[num_groups] = static_cast<int32_t>(rows);
    SY_ASSIGN_OR_RETURN(const void* x_dev, ToDevice(x + first * hidden, rows, hidden));
    SY_RETURN_IF_ERROR(y_dev_.Reserve(rows * hidden * 2, "expert output"));
    const int64_t ws = GroupedExpertFfnWorkspaceBytes(rows, inter);
    SY_RETURN_IF_ERROR(workspace_.Reserve(ws, "expert FFN workspace"));
    SY_RETURN_IF_ERROR(cuda::GroupedExpertFfn(*gemm_, ffn_weights_.data(), num_groups,
                                              offsets32_.data(), hidden, inter, x_dev,
                                              y_dev_.get(), workspace_.get(), ws, stream_));
    y_bf16_.resize(static_cast<size_t>(rows * hidden));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(y_bf16_.data(), y_dev_.get(), y_bf16_.size() * 2,
                                            cudaMemcpyDeviceToHost, stream_),
                            "copying expert outputs to the host"));
    SY_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "grouped expert FFN"));
    cpu::RowFromBf16(y_bf16_.data(), rows * hidden, y + first * hidden);
    return absl::OkStatus();
  }

  // The paged KV cache on the device: each layer's cache (PagedKv with num_blocks) gets a
  // device copy of its shape, written here and read only by attention here (nothing else
  // reads a layer's K/V), so the host arrays are left unwritten. A PagedKv without
  // num_blocks stays on the CPU.
  absl::Status WriteKv(const float* k, const float* v, int64_t num_tokens, const int64_t* slots,
                       const PagedKv& kv) override {
    if (kv.num_blocks <= 0) return cpu_->WriteKv(k, v, num_tokens, slots, kv);
    if (num_tokens <= 0) return absl::OkStatus();
    SY_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    SY_ASSIGN_OR_RETURN(DeviceKv * dkv, KvOf(kv));
    const int64_t row = kv.num_kv_heads * kv.head_dim, num_slots = kv.num_blocks * kv.block_size;
    for (int64_t t = 0; t < num_tokens; ++t)
      if (slots[t] < 0 || slots[t] >= num_slots)
        return absl::InvalidArgumentError(
            absl::StrCat("KV slot ", slots[t], " of token ", t, " outside the cache's ", num_slots));
    SY_RETURN_IF_ERROR(kv_in_.Reserve(2 * num_tokens * row * 4 + num_tokens * 8, "new K/V rows"));
    char* base = static_cast<char*>(kv_in_.get());
    float* k_dev = reinterpret_cast<float*>(base);
    float* v_dev = k_dev + num_tokens * row;
    int64_t* slots_dev = reinterpret_cast<int64_t*>(v_dev + num_tokens * row);
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(k_dev, k, num_tokens * row * 4, cudaMemcpyHostToDevice, stream_), "K rows"));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(v_dev, v, num_tokens * row * 4, cudaMemcpyHostToDevice, stream_), "V rows"));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(slots_dev, slots, num_tokens * 8, cudaMemcpyHostToDevice, stream_), "KV slots"));
    SY_RETURN_IF_ERROR(WritePagedKv(k_dev, v_dev, DType::kF32, num_tokens, row, slots_dev, num_slots,
                                    dkv->k.get(), dkv->v.get(), stream_));
    return Cuda(cudaStreamSynchronize(stream_), "writing the KV cache");
  }

  absl::Status Attention(const float* q, int64_t num_new, int64_t start_pos, int64_t num_heads,
                         const PagedKv& kv, const int32_t* block_table, float scale,
                         float* out) override {
    if (kv.num_blocks <= 0)
      return cpu_->Attention(q, num_new, start_pos, num_heads, kv, block_table, scale, out);
    const AttentionSeq one{q, num_new, start_pos, block_table, out};
    return AttentionBatch(&one, 1, num_heads, kv, scale);
  }

  // Every new token is one query of PagedDecodeAttention over the positions up to its own
  // (a prefill chunk of n tokens is n queries with growing context lengths).
  absl::Status AttentionBatch(const AttentionSeq* seqs, int64_t num_seqs, int64_t num_heads,
                              const PagedKv& kv, float scale) override {
    if (kv.num_blocks <= 0) return cpu_->AttentionBatch(seqs, num_seqs, num_heads, kv, scale);
    SY_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    SY_ASSIGN_OR_RETURN(DeviceKv * dkv, KvOf(kv));
    const int64_t hd = kv.head_dim, qrow = num_heads * hd, bs = kv.block_size;
    int64_t queries = 0, max_blocks = 1;
    for (int64_t s = 0; s < num_seqs; ++s) {
      if (seqs[s].num_new <= 0) continue;
      queries += seqs[s].num_new;
      const int64_t blocks = (seqs[s].start_pos + seqs[s].num_new + bs - 1) / bs;
      for (int64_t b = 0; b < blocks; ++b)
        if (seqs[s].block_table[b] < 0 || seqs[s].block_table[b] >= kv.num_blocks)
          return absl::InvalidArgumentError(absl::StrCat("sequence ", s, ": block id ",
                                                         seqs[s].block_table[b], " out of range"));
      max_blocks = std::max(max_blocks, blocks);
    }
    if (queries == 0) return absl::OkStatus();
    q_host_.resize(static_cast<size_t>(queries * qrow));
    tables_.assign(static_cast<size_t>(queries * max_blocks), 0);
    lens_.resize(static_cast<size_t>(queries));
    int64_t e = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      const AttentionSeq& a = seqs[s];
      if (a.num_new <= 0) continue;
      const int64_t blocks = (a.start_pos + a.num_new + bs - 1) / bs;
      std::copy(a.q, a.q + a.num_new * qrow, q_host_.begin() + e * qrow);
      for (int64_t i = 0; i < a.num_new; ++i, ++e) {
        std::copy(a.block_table, a.block_table + blocks, tables_.begin() + e * max_blocks);
        lens_[e] = static_cast<int32_t>(a.start_pos + i + 1);
      }
    }
    const int64_t q_bytes = queries * qrow * 4, t_bytes = queries * max_blocks * 4,
                  l_bytes = queries * 4;
    const int64_t ws = PagedDecodeAttentionWorkspaceBytes(queries, num_heads, hd);
    auto round = [](int64_t b) { return (b + 255) / 256 * 256; };
    SY_RETURN_IF_ERROR(attn_in_.Reserve(round(q_bytes) + round(t_bytes) + round(l_bytes) + ws,
                                        "attention inputs"));
    SY_RETURN_IF_ERROR(y_dev_.Reserve(q_bytes, "attention output"));
    char* base = static_cast<char*>(attn_in_.get());
    float* q_dev = reinterpret_cast<float*>(base);
    int32_t* tables_dev = reinterpret_cast<int32_t*>(base + round(q_bytes));
    int32_t* lens_dev = reinterpret_cast<int32_t*>(base + round(q_bytes) + round(t_bytes));
    void* ws_dev = base + round(q_bytes) + round(t_bytes) + round(l_bytes);
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(q_dev, q_host_.data(), q_bytes, cudaMemcpyHostToDevice, stream_), "queries"));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(tables_dev, tables_.data(), t_bytes, cudaMemcpyHostToDevice, stream_), "block tables"));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(lens_dev, lens_.data(), l_bytes, cudaMemcpyHostToDevice, stream_), "context lengths"));
    float* out_dev = static_cast<float*>(y_dev_.get());
    constexpr int64_t kMaxQueriesPerLaunch = 65535;
    for (int64_t first = 0; first < queries; first += kMaxQueriesPerLaunch) {
      const int64_t n = std::min(kMaxQueriesPerLaunch, queries - first);
      SY_RETURN_IF_ERROR(PagedDecodeAttention(
          q_dev + first * qrow, DType::kF32, dkv->k.get(), dkv->v.get(), DType::kF32,
          tables_dev + first * max_blocks, lens_dev + first, n, num_heads, kv.num_kv_heads, hd,
          bs, max_blocks, scale, out_dev + first * qrow, DType::kF32, ws_dev, ws, stream_));
    }
    out_host_.resize(static_cast<size_t>(queries * qrow));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(out_host_.data(), out_dev, q_bytes, cudaMemcpyDeviceToHost, stream_),
                            "attention output"));
    SY_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "attention"));
    e = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      const AttentionSeq& a = seqs[s];
      if (a.num_new <= 0) continue;
      std::copy(out_host_.begin() + e * qrow, out_host_.begin() + (e + a.num_new) * qrow, a.out);
      e += a.num_new;
    }
    return absl::OkStatus();
  }

  // The rest on the CPU.
  absl::Status RmsNorm(const float* x, int64_t num_rows, int64_t dim, const WeightView& weight,
                       float eps, float* y) override {
    return cpu_->RmsNorm(x, num_rows, dim, weight, eps, y);
  }
  absl::Status ApplyRope(float* q, float* k, int64_t num_tokens, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, const int32_t* positions,
                         double theta) override {
    return cpu_->ApplyRope(q, k, num_tokens, num_heads, num_kv_heads, head_dim, positions, theta);
  }
  absl::Status AddGated(const float* x, const float* gate, int64_t num_rows, int64_t dim,
                        float* y) override {
    return cpu_->AddGated(x, gate, num_rows, dim, y);
  }

 private:
  struct DeviceKv {
    DeviceBuffer k, v;
  };
  // The device cache of the layer whose host K array is kv.k, allocated on first use.
  absl::StatusOr<DeviceKv*> KvOf(const PagedKv& kv) {
    auto& slot = kv_[kv.k];
    if (slot != nullptr) return slot.get();
    auto dkv = std::make_unique<DeviceKv>();
    const int64_t bytes = kv.num_blocks * kv.block_size * kv.num_kv_heads * kv.head_dim * 4;
    absl::Status s = dkv->k.Reserve(bytes, "the KV cache of a layer (K)");
    if (s.ok()) s = dkv->v.Reserve(bytes, "the KV cache of a layer (V)");
    if (!s.ok()) {
      kv_.erase(kv.k);
      return s;
    }
    SY_RETURN_IF_ERROR(Cuda(cudaMemset(dkv->k.get(), 0, bytes), "clearing the KV cache"));
    SY_RETURN_IF_ERROR(Cuda(cudaMemset(dkv->v.get(), 0, bytes), "clearing the KV cache"));
    slot = std::move(dkv);
    return slot.get();
  }

  // The device copy of w (bf16, dense), uploaded on first use.
  absl::StatusOr<const void*> Upload(const WeightView& w) {
    const auto key = std::make_tuple(w.data, w.rows, w.cols, w.row_stride, w.dtype);
    if (auto it = weights_.find(key); it != weights_.end()) return it->second;
    if (w.data == nullptr || w.rows <= 0 || w.cols <= 0)
      return absl::InvalidArgumentError(absl::StrCat("weight [", w.rows, ", ", w.cols, "] has no data"));
    const int64_t bytes = w.rows * w.cols * 2;
    void* dev = nullptr;
    const cudaError_t err = cudaMalloc(&dev, static_cast<size_t>(bytes));
    if (err != cudaSuccess) {
      cudaGetLastError();
      size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "a [%d, %d] weight (%.1f MiB in bf16) does not fit on cuda:%d: %.1f MiB free of "
          "%.1f MiB, %.1f MiB already holding %d weights",
          w.rows, w.cols, bytes / 1048576.0, device_, free_bytes / 1048576.0,
          total / 1048576.0, uploaded_bytes_ / 1048576.0, weights_.size()));
    }
    ToBf16Rows(w, &staging_);
    absl::Status copied = Cuda(cudaMemcpy(dev, staging_.data(), static_cast<size_t>(bytes),
                                          cudaMemcpyHostToDevice),
                               "uploading a weight");
    if (!copied.ok()) {
      cudaFree(dev);
      return copied;
    }
    weights_.emplace(key, dev);
    uploaded_bytes_ += bytes;
    return dev;
  }

  // x [rows, cols] f32 on the host → bf16 on the device (x_dev_).
  absl::StatusOr<const void*> ToDevice(const float* x, int64_t rows, int64_t cols) {
    x_bf16_.resize(static_cast<size_t>(rows * cols));
    cpu::RowToBf16(x, rows * cols, x_bf16_.data());
    SY_RETURN_IF_ERROR(x_dev_.Reserve(rows * cols * 2, "activations"));
    SY_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(x_dev_.get(), x_bf16_.data(), x_bf16_.size() * 2,
                                            cudaMemcpyHostToDevice, stream_),
                            "copying activations to the device"));
    return x_dev_.get();
  }

  const int device_;
  cudaStream_t stream_;
  std::unique_ptr<GemmContext> gemm_;
  std::unique_ptr<Backend> cpu_;
  std::map<std::tuple<const void*, int64_t, int64_t, int64_t, DType>, void*> weights_;
  int64_t uploaded_bytes_ = 0;
  std::vector<uint16_t> staging_, x_bf16_, y_bf16_;
  std::vector<ExpertFfnWeights> ffn_weights_;
  std::vector<int32_t> offsets32_;
  DeviceBuffer x_dev_, y_dev_, workspace_, kv_in_, attn_in_;
  std::map<const float*, std::unique_ptr<DeviceKv>> kv_;
  std::vector<float> q_host_, out_host_;
  std::vector<int32_t> tables_, lens_;
};

}  // namespace

absl::Status ProbeCudaDevice(int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat(
        "no usable CUDA device: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
  }
  if (count == 0) return absl::FailedPreconditionError("no CUDA device on this host");
  if (device < 0 || device >= count)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda:", device, ": this host has ", count, " CUDA device(s)"));
  cudaDeviceProp prop{};
  SY_RETURN_IF_ERROR(Cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  if (prop.major < 9)
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda:", device, " is ", prop.name, " (sm_", prop.major, prop.minor,
        "); this build's kernels need sm_90 or newer (H100, H200)"));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device) {
  SY_RETURN_IF_ERROR(ProbeCudaDevice(device));
  SY_RETURN_IF_ERROR(Cuda(cudaSetDevice(device), "cudaSetDevice"));
  SY_ASSIGN_OR_RETURN(std::unique_ptr<GemmContext> gemm, GemmContext::Create(GemmBackend::kAuto));
  cudaStream_t stream = nullptr;
  SY_RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  return std::unique_ptr<Backend>(
      new CudaBackend(device, stream, std::move(gemm), MakeFastCpuBackend()));
}

}  // namespace sy::kernels::cuda
