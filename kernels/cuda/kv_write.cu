// WritePagedKv (phase 5 of kernels/cuda/cuda_kernels.h): this step's K/V rows into the paged
// cache by slot, one block per token copying its K and V rows (16-byte words when the rows
// and pointers allow, else 2-byte words).
#include "kernels/cuda/cuda_util.cuh"

namespace sy::kernels::cuda {
namespace {

template <typename Word>
__global__ void WriteKvKernel(const Word* __restrict__ k, const Word* __restrict__ v,
                              int64_t words_per_row, const int64_t* __restrict__ slots,
                              int64_t num_slots, Word* __restrict__ k_cache,
                              Word* __restrict__ v_cache) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;  // the launcher's caller checked; never write out of bounds
  const Word* ks = k + t * words_per_row;
  const Word* vs = v + t * words_per_row;
  Word* kd = k_cache + slot * words_per_row;
  Word* vd = v_cache + slot * words_per_row;
  for (int64_t i = threadIdx.x; i < words_per_row; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

absl::Status WritePagedKv(const void* k, const void* v, DType dtype, int64_t num_tokens,
                          int64_t row_elems, const int64_t* slots, int64_t num_slots,
                          void* k_cache, void* v_cache, cudaStream_t stream) {
  if (auto s = internal::CheckActDType(dtype, "WritePagedKv"); !s.ok()) return s;
  if (num_tokens < 0 || num_tokens > INT32_MAX || row_elems <= 0 || num_slots < 0)
    return absl::InvalidArgumentError(absl::StrCat("WritePagedKv: bad sizes tokens=", num_tokens,
                                                   " row=", row_elems, " slots=", num_slots));
  if (num_tokens == 0) return absl::OkStatus();
  const int64_t row_bytes = row_elems * DTypeSize(dtype);
  if (row_bytes % 16 == 0 && Aligned16(k) && Aligned16(v) && Aligned16(k_cache) &&
      Aligned16(v_cache)) {
    WriteKvKernel<uint4><<<num_tokens, 128, 0, stream>>>(
        static_cast<const uint4*>(k), static_cast<const uint4*>(v), row_bytes / 16, slots,
        num_slots, static_cast<uint4*>(k_cache), static_cast<uint4*>(v_cache));
  } else {
    WriteKvKernel<uint16_t><<<num_tokens, 128, 0, stream>>>(
        static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), row_bytes / 2, slots,
        num_slots, static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache));
  }
  return internal::LaunchStatus("WriteKvKernel");
}

}  // namespace sy::kernels::cuda
