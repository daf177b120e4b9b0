// Paged decode attention (phase 5 of kernels/cuda/cuda_kernels.h).
//
// One block of kWarps warps per (sequence, head). Warp w takes keys w·U .. w·U+U-1, then
// strides by kWarps·U; each lane holds head_dim/32 elements of q and of its accumulator, a dot
// product is a warp butterfly sum. kKeysPerStep (U) independent keys per step keep several
// loads and shuffles in flight per warp. Each warp keeps an online softmax (running max m,
// sum l, accumulator acc, Milakov & Gimelshein 2018); the warps are merged through shared
// memory at the end in warp order, so results are deterministic.
//
// Split contexts (flash-decoding): when num_seqs × num_heads blocks would leave SMs idle and a
// workspace is given, blockIdx.z takes keys [z·split_len, (z+1)·split_len) and writes its
// unnormalised partial (m, l, acc) to the workspace; MergeSplitsKernel then combines the
// splits of each (seq, head) in split order.
#include "kernels/cuda/cuda_util.cuh"

namespace sy::kernels::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 256;
constexpr int kPerLane = kMaxHeadDim / 32;
constexpr int kKeysPerStep = 4;

template <typename TQ, typename TKV, typename TO>
__global__ void __launch_bounds__(kWarps * 32)
    PagedDecodeAttentionKernel(const TQ* __restrict__ q, const TKV* __restrict__ k_cache,
                               const TKV* __restrict__ v_cache,
                               const int32_t* __restrict__ block_tables,
                               const int32_t* __restrict__ context_lens, int num_heads,
                               int num_kv_heads, int head_dim, int block_size,
                               int64_t max_blocks_per_seq, float scale, TO* __restrict__ out,
                               int split_len, float* __restrict__ partial) {
  __shared__ float sm_m[kWarps], sm_l[kWarps];
  __shared__ float sm_acc[kWarps][kMaxHeadDim];
  const int h = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kvh = h / (num_heads / num_kv_heads);
  const int len = context_lens[s];
  TO* o = out + (s * num_heads + h) * head_dim;
  // Split z covers keys [begin, end); without splits (partial == nullptr) the whole context.
  const int begin = partial ? static_cast<int>(blockIdx.z) * split_len : 0;
  const int end = partial ? min(len, begin + split_len) : len;
  // Partial record of this (seq, head, split): [m, l, acc[head_dim]] f32.
  float* rec = partial ? partial + ((s * num_heads + h) * gridDim.z + blockIdx.z) * (head_dim + 2) : nullptr;
  if (end <= begin) {  // empty context or empty split
    if (rec) {
      if (threadIdx.x == 0) {
        rec[0] = -INFINITY;
        rec[1] = 0.f;
      }
      for (int d = threadIdx.x; d < head_dim; d += blockDim.x) rec[2 + d] = 0.f;
    } else {
      for (int d = threadIdx.x; d < head_dim; d += blockDim.x) internal::Store(o, d, 0.f);
    }
    return;
  }
  const int32_t* table = block_tables + s * max_blocks_per_seq;
  const int64_t row_stride = static_cast<int64_t>(num_kv_heads) * head_dim;

  float qr[kPerLane], acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int d = lane + 32 * j;
    qr[j] = d < head_dim ? internal::Load(q, (s * num_heads + h) * head_dim + d) * scale : 0.f;
    acc[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;

  for (int p0 = begin + warp * kKeysPerStep; p0 < end; p0 += kWarps * kKeysPerStep) {
    int64_t base[kKeysPerStep];
    float score[kKeysPerStep];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int p = p0 + u;
      base[u] = -1;
      score[u] = 0.f;
      if (p < end) {
        const int64_t blk = table[p / block_size];
        base[u] = ((blk * block_size + p % block_size) * row_stride) + static_cast<int64_t>(kvh) * head_dim;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int d = lane + 32 * j;
          if (d < head_dim) score[u] += qr[j] * internal::Load(k_cache, base[u] + d);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) score[u] = internal::WarpSum(score[u]);
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u)
      if (base[u] >= 0) m_new = fmaxf(m_new, score[u]);
    const float corr = expf(m - m_new);  // m == -inf on the first step: corr = 0
    l *= corr;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[j] *= corr;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      if (base[u] < 0) continue;
      const float pexp = expf(score[u] - m_new);
      l += pexp;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) acc[j] += pexp * internal::Load(v_cache, base[u] + d);
      }
    }
    m = m_new;
  }

  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int d = lane + 32 * j;
    if (d < head_dim) sm_acc[warp][d] = acc[j];
  }
  __syncthreads();
  float gm = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) gm = fmaxf(gm, sm_m[w]);  // finite: warp 0 had key `begin`
  float gl = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) gl += sm_l[w] * expf(sm_m[w] - gm);
  if (rec && threadIdx.x == 0) {
    rec[0] = gm;
    rec[1] = gl;
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += sm_acc[w][d] * expf(sm_m[w] - gm);
    if (rec) {
      rec[2 + d] = v;
    } else {
      internal::Store(o, d, v / gl);
    }
  }
}

// One block per (head, seq): out = Σ_z acc_z · e^(m_z − M) / Σ_z l_z · e^(m_z − M), M = max m_z,
// in split order. All splits empty (context 0) gives zeros.
template <typename TO>
__global__ void MergeSplitsKernel(const float* __restrict__ partial, int num_splits, int num_heads,
                                  int head_dim, TO* __restrict__ out) {
  const int h = blockIdx.x;
  const int64_t s = blockIdx.y;
  const float* recs = partial + (s * num_heads + h) * num_splits * (head_dim + 2);
  TO* o = out + (s * num_heads + h) * head_dim;
  float gm = -INFINITY;
  for (int z = 0; z < num_splits; ++z) gm = fmaxf(gm, recs[z * (head_dim + 2)]);
  if (gm == -INFINITY) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) internal::Store(o, d, 0.f);
    return;
  }
  float gl = 0.f;
  for (int z = 0; z < num_splits; ++z) {
    const float* r = recs + z * (head_dim + 2);
    gl += r[1] * expf(r[0] - gm);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float v = 0.f;
    for (int z = 0; z < num_splits; ++z) {
      const float* r = recs + z * (head_dim + 2);
      v += r[2 + d] * expf(r[0] - gm);
    }
    internal::Store(o, d, v / gl);
  }
}

int SmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 0;
  return sms;
}

}  // namespace

int64_t PagedDecodeAttentionWorkspaceBytes(int64_t num_seqs, int64_t num_heads, int64_t head_dim) {
  return num_seqs * num_heads * kMaxAttentionSplits * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

absl::Status PagedDecodeAttention(const void* q, DType q_dtype, const void* k_cache,
                                  const void* v_cache, DType kv_dtype,
                                  const int32_t* block_tables, const int32_t* context_lens,
                                  int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t head_dim, int64_t block_size,
                                  int64_t max_blocks_per_seq, float scale, void* out,
                                  DType out_dtype, void* workspace, int64_t workspace_bytes,
                                  cudaStream_t stream) {
  if (auto s = internal::CheckActDType(q_dtype, "PagedDecodeAttention q"); !s.ok()) return s;
  if (auto s = internal::CheckActDType(kv_dtype, "PagedDecodeAttention kv"); !s.ok()) return s;
  if (auto s = internal::CheckActDType(out_dtype, "PagedDecodeAttention out"); !s.ok()) return s;
  if (num_seqs < 0 || num_seqs > 65535 || num_heads < 1 || num_heads > INT32_MAX ||
      num_kv_heads < 1 || num_heads % num_kv_heads != 0 || head_dim < 1 ||
      head_dim > kMaxHeadDim || block_size < 1 || block_size > INT32_MAX || max_blocks_per_seq < 1)
    return absl::InvalidArgumentError(absl::StrCat(
        "PagedDecodeAttention: bad sizes seqs=", num_seqs, " heads=", num_heads, " kv_heads=",
        num_kv_heads, " head_dim=", head_dim, " (<= ", kMaxHeadDim, ") block_size=", block_size,
        " max_blocks_per_seq=", max_blocks_per_seq));
  if (max_blocks_per_seq * block_size > INT32_MAX)
    return absl::InvalidArgumentError("PagedDecodeAttention: context longer than 2^31 keys");
  if (num_seqs == 0) return absl::OkStatus();
  if (!(scale > 0)) scale = 1.f / sqrtf(static_cast<float>(head_dim));

  // Splits: enough blocks for two waves over the SMs, each split at least kMinSplitKeys keys
  // of the longest possible context, as many as the workspace holds.
  constexpr int64_t kMinSplitKeys = 256;
  const int64_t max_context = max_blocks_per_seq * block_size;
  const int64_t blocks = num_seqs * num_heads;
  int64_t splits = 1;
  if (workspace != nullptr) {
    const int64_t sms = SmCount();
    splits = std::min<int64_t>({(2 * sms + blocks - 1) / blocks, (max_context + kMinSplitKeys - 1) / kMinSplitKeys,
                                kMaxAttentionSplits});
    const int64_t per_split = blocks * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, workspace_bytes / per_split));
  }
  const int64_t step = kWarps * kKeysPerStep;
  const int split_len = static_cast<int>(((max_context + splits - 1) / splits + step - 1) / step * step);
  float* partial = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  const dim3 grid(static_cast<unsigned>(num_heads), static_cast<unsigned>(num_seqs),
                  static_cast<unsigned>(splits));
  internal::Dispatch(q_dtype, [&](auto* qt) {
    using TQ = std::remove_pointer_t<decltype(qt)>;
    internal::Dispatch(kv_dtype, [&](auto* kt) {
      using TKV = std::remove_pointer_t<decltype(kt)>;
      internal::Dispatch(out_dtype, [&](auto* ot) {
        using TO = std::remove_pointer_t<decltype(ot)>;
        PagedDecodeAttentionKernel<TQ, TKV, TO><<<grid, kWarps * 32, 0, stream>>>(
            static_cast<const TQ*>(q), static_cast<const TKV*>(k_cache),
            static_cast<const TKV*>(v_cache), block_tables, context_lens,
            static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
            static_cast<int>(head_dim), static_cast<int>(block_size), max_blocks_per_seq, scale,
            static_cast<TO*>(out), split_len, partial);
      });
    });
  });
  if (auto st = internal::LaunchStatus("PagedDecodeAttentionKernel"); !st.ok() || partial == nullptr) return st;
  internal::Dispatch(out_dtype, [&](auto* ot) {
    using TO = std::remove_pointer_t<decltype(ot)>;
    MergeSplitsKernel<TO><<<dim3(static_cast<unsigned>(num_heads), static_cast<unsigned>(num_seqs)), 64, 0,
                            stream>>>(partial, static_cast<int>(splits), static_cast<int>(num_heads),
                                      static_cast<int>(head_dim), static_cast<TO*>(out));
  });
  return internal::LaunchStatus("MergeSplitsKernel");
}

}  // namespace sy::kernels::cuda
