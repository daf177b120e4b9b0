// CUDA kernels of one MoE decoder layer, as host launchers over raw device pointers.
//
// Who calls it: a GPU step executor (and tests/kernels/cuda_kernels_gpu_test.cc,
// bench/cuda_kernels_bench.cc). Like DeepEP's kernels/api.cuh, every launcher takes raw device
// pointers, sizes and a cudaStream_t, and the launchers are grouped by the phase of a layer:
//
//   RmsNorm → ApplyRope → PagedDecodeAttention          (attention block)
//   RmsNorm → RouteTopK → MoePermuteLayout → MoeGatherRows → GroupedExpertFfn → MoeCombine
//
// Only the caller knows about tensors; here every tensor states its shape, layout (always
// row-major, densely packed unless a stride is given) and dtype. Activation dtypes are
// DType::kF32 or DType::kBF16 (kF16 is rejected with InvalidArgument); all math is f32.
//
// Errors: every launcher returns absl::Status: InvalidArgument for bad sizes or dtypes (checked
// on the host before anything is launched), Internal with the CUDA error string when a launch
// fails. Launches are asynchronous on `stream`: a fault inside a kernel surfaces at the next
// synchronising call, as CUDA does.
//
// Thread safety: launchers are stateless and may be called from any thread. A GemmContext
// owns a cuBLAS handle and must be used by one thread at a time.
//
// Determinism: every kernel here is deterministic run to run (no float atomics; fixed
// reduction orders). See kernels/cuda/README.md for the invariants.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/core/dtype.h"

namespace sy::kernels::cuda {

// Internal status for a CUDA error: Internal("<context>: <cudaGetErrorString>"). OK for
// cudaSuccess.
absl::Status CudaStatus(cudaError_t err, const char* context);

// ---- Phase 1: normalisation and positions ------------------------------------------------------

// y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, in f32, rounded once to y_dtype.
//   x:      [num_rows, dim], x_dtype (f32 or bf16)
//   weight: [dim], w_dtype (f32 or bf16)
//   y:      [num_rows, dim], y_dtype; y may equal x (same dtype) for an in-place norm.
// One block per row; 16-byte vector loads when dim and the pointers allow.
absl::Status RmsNorm(const void* x, DType x_dtype, int64_t num_rows, int64_t dim,
                     const void* weight, DType w_dtype, float eps, void* y, DType y_dtype,
                     cudaStream_t stream);

// Rotary position embedding, rotate-half (GPT-NeoX / HF `rotate_half`), in place:
// for pair i < head_dim/2, angle = positions[t] * theta^(-2i/head_dim) (computed in double),
//   v[i] = v[i]·cos − v[i+half]·sin,  v[i+half] = v[i+half]·cos + v[i]·sin.
//   q:         [num_tokens, num_heads, head_dim], dtype
//   k:         [num_tokens, num_kv_heads, head_dim], dtype; may be null when num_kv_heads == 0
//   positions: [num_tokens] int32
// head_dim must be even.
absl::Status ApplyRope(void* q, void* k, DType dtype, int64_t num_tokens, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, const int32_t* positions,
                       double theta, cudaStream_t stream);

// ---- Phase 2: routing --------------------------------------------------------------------------

inline constexpr int64_t kMaxExperts = 256;
inline constexpr int64_t kMaxTopk = 8;

// Softmax over experts, then the num_topk largest per token; same semantics as
// model/router.cc RouteTopK: experts are ordered by logit, ties go to the lower expert id,
// weights are the softmax probabilities, divided by their top-k sum when `renormalize`.
//   logits:       [num_tokens, num_experts] f32
//   topk_ids:     [num_tokens, num_topk] int32, best first
//   topk_weights: [num_tokens, num_topk] f32
// num_experts <= kMaxExperts, 1 <= num_topk <= min(kMaxTopk, num_experts). One warp per token.
absl::Status RouteTopK(const float* logits, int64_t num_tokens, int64_t num_experts,
                       int64_t num_topk, bool renormalize, int32_t* topk_ids,
                       float* topk_weights, cudaStream_t stream);

// ---- Phase 3: MoE permute (layout → gather → [expert FFN] → combine) ----------------------------
//
// The flat index of a routing choice is f = t * num_topk + j (token t, its j-th choice). The
// grouped buffer holds one row per valid choice, expert by expert; inside an expert, rows are
// in ascending flat index (stable, so the layout is deterministic). A choice whose id is
// outside [0, num_experts) (e.g. -1, or an expert owned by another rank) gets no row.

// From topk_ids builds:
//   expert_counts:    [num_experts] int32, rows of each expert
//   expert_offsets:   [num_experts + 1] int32, exclusive scan of counts; offsets[E] = rows
//   grouped_to_flat:  [num_tokens * num_topk] int32; entry i < offsets[E] is the flat index of
//                     grouped row i, entries past the last row are -1
//   flat_to_grouped:  [num_tokens * num_topk] int32; grouped row of each choice, -1 if dropped
// topk_ids: [num_tokens, num_topk] int32 (device).
absl::Status MoePermuteLayout(const int32_t* topk_ids, int64_t num_tokens, int64_t num_topk,
                              int64_t num_experts, int32_t* expert_counts,
                              int32_t* expert_offsets, int32_t* grouped_to_flat,
                              int32_t* flat_to_grouped, cudaStream_t stream);

// grouped_x[i] = x[grouped_to_flat[i] / num_topk] for i < num_rows; rows whose entry is -1
// are zero-filled.
//   x:               [num_tokens, hidden], dtype
//   grouped_to_flat: [num_rows] int32 (num_rows is usually num_tokens * num_topk)
//   grouped_x:       [num_rows, hidden], dtype
absl::Status MoeGatherRows(const void* x, DType dtype, int64_t num_tokens, int64_t hidden,
                           int64_t num_topk, const int32_t* grouped_to_flat, int64_t num_rows,
                           void* grouped_x, cudaStream_t stream);

// out[t] = Σ_j topk_weights[t, j] · grouped_y[flat_to_grouped[t*k + j]], summed in f32 in
// order j = 0..k-1 (deterministic, no atomics); dropped choices (-1) add nothing.
//   grouped_y:       [num_rows, hidden], y_dtype (any row count; only referenced rows read)
//   flat_to_grouped: [num_tokens * num_topk] int32
//   topk_weights:    [num_tokens, num_topk] f32
//   out:             [num_tokens, hidden], out_dtype (overwritten)
absl::Status MoeCombine(const void* grouped_y, DType y_dtype, const int32_t* flat_to_grouped,
                        const float* topk_weights, int64_t num_tokens, int64_t num_topk,
                        int64_t hidden, void* out, DType out_dtype, cudaStream_t stream);

// ---- Phase 4: grouped expert FFN ---------------------------------------------------------------

// Which GEMM runs the expert projections.
enum class GemmBackend {
  kAuto,     // cuBLAS when libcublas.so.13 can be loaded, else kBuiltin
  kCublas,   // cublasGemmEx, bf16 inputs, CUBLAS_COMPUTE_32F; NotFound if cuBLAS cannot load
  kBuiltin,  // this library's kernels, f32 accumulate: a warp-per-column skinny GEMM for
             // M <= 32 (K % 8 == 0), else a tensor-core (WMMA bf16) tiled GEMM
};

// A GEMM engine: y[M, N] = x[M, K] · W[N, K]^T with x, W bf16 row-major and y f32 or bf16.
// cuBLAS is loaded at run time (dlopen "libcublas.so.13"), so binaries start on machines
// without it and fall back to the built-in kernel. One thread at a time.
class GemmContext {
 public:
  static absl::StatusOr<std::unique_ptr<GemmContext>> Create(GemmBackend backend);
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  GemmBackend backend() const { return backend_; }  // kCublas or kBuiltin, never kAuto
  std::string name() const { return backend_ == GemmBackend::kCublas ? "cublas" : "builtin"; }

  // y [M, N] (y_dtype f32 or bf16, leading dimension N) = x [M, K] bf16 · w [N, K]^T bf16.
  absl::Status Gemm(const void* x, const void* w, int64_t m, int64_t n, int64_t k, void* y,
                    DType y_dtype, cudaStream_t stream);

 private:
  GemmContext() = default;
  GemmBackend backend_ = GemmBackend::kBuiltin;
  void* cublas_handle_ = nullptr;  // cublasHandle_t when backend_ == kCublas
};

// One expert's SwiGLU weights on the device, bf16, HF layout [out_features, in_features]:
struct ExpertFfnWeights {
  const void* w1 = nullptr;  // gate_proj [inter, hidden] bf16
  const void* w3 = nullptr;  // up_proj   [inter, hidden] bf16
  const void* w2 = nullptr;  // down_proj [hidden, inter] bf16
};

// Device scratch GroupedExpertFfn needs for num_rows rows: two f32 [num_rows, inter]
// projections and one bf16 [num_rows, inter] activation, 256-byte aligned.
int64_t GroupedExpertFfnWorkspaceBytes(int64_t num_rows, int64_t inter);

// For each expert e with rows [offsets[e], offsets[e+1]) of the grouped buffer:
//   y[rows] = w2_e · (silu(w1_e · x[rows]) ⊙ (w3_e · x[rows]))
// with f32 accumulation; the projections stay f32 until the fused SiLU·mul rounds the
// activation to bf16 (as a bf16 HF model does).
//   experts:        [num_experts] host array of device weight pointers; an expert with no rows
//                   may have null pointers
//   offsets_host:   [num_experts + 1] int32 on the HOST (copy MoePermuteLayout's
//                   expert_offsets back first; the GEMM shapes depend on it)
//   x:              [offsets[E], hidden] bf16 (grouped rows)
//   y:              [offsets[E], hidden] bf16
//   workspace:      >= GroupedExpertFfnWorkspaceBytes(offsets[E], inter) device bytes
absl::Status GroupedExpertFfn(GemmContext& gemm, const ExpertFfnWeights* experts,
                              int64_t num_experts, const int32_t* offsets_host, int64_t hidden,
                              int64_t inter, const void* x, void* y, void* workspace,
                              int64_t workspace_bytes, cudaStream_t stream);

// act[r, i] = bf16(silu(gate[r, i]) * up[r, i]), silu(g) = g / (1 + exp(-g)).
//   gate, up: [num_rows, inter] f32;  act: [num_rows, inter] bf16
absl::Status SiluMul(const float* gate, const float* up, int64_t num_rows, int64_t inter,
                     void* act, cudaStream_t stream);

// ---- Phase 5: paged KV cache and decode attention ----------------------------------------------

// This step's K and V rows into the paged cache (vLLM's slot mapping): token t's rows go to
// slot slots[t] = block · block_size + row of k_cache and v_cache.
//   k, v:             [num_tokens, row_elems] dtype (row_elems = num_kv_heads · head_dim)
//   slots:            [num_tokens] int64 (device); a slot outside [0, num_slots) is skipped
//                     (check them on the host: the kernel cannot report it)
//   k_cache, v_cache: [num_slots, row_elems] dtype (= [num_blocks, block_size, kv_heads, hd])
// One block per token.
absl::Status WritePagedKv(const void* k, const void* v, DType dtype, int64_t num_tokens,
                          int64_t row_elems, const int64_t* slots, int64_t num_slots,
                          void* k_cache, void* v_cache, cudaStream_t stream);


// One new token per sequence attends to its whole context in the paged KV cache (the new
// token's K/V already written). Layout as model/kv_cache.h:
//   q:            [num_seqs, num_heads, head_dim], q_dtype
//   k_cache,
//   v_cache:      [num_blocks, block_size, num_kv_heads, head_dim], kv_dtype each
//   block_tables: [num_seqs, max_blocks_per_seq] int32; position p of sequence s is in block
//                 block_tables[s, p / block_size], row p % block_size
//   context_lens: [num_seqs] int32, keys 0 .. context_lens[s]-1 (0 gives a zero output)
//   out:          [num_seqs, num_heads, head_dim], out_dtype
//   workspace:    optional device scratch (may be null) of workspace_bytes; with at least
//                 PagedDecodeAttentionWorkspaceBytes(...) the context is split over several
//                 blocks when (seqs × heads) alone would not fill the GPU (flash-decoding)
// GQA: head h reads KV head h / (num_heads / num_kv_heads). scale <= 0 means 1/sqrt(head_dim).
// head_dim <= 256; num_heads a multiple of num_kv_heads. One block per (seq, head, split), its
// warps split the keys and each keeps an online softmax (running max, sum, accumulator) in
// f32; splits are merged by a second kernel in split order. The split count depends only on
// the shapes and the device's SM count, so results are bitwise repeatable on one device.
absl::Status PagedDecodeAttention(const void* q, DType q_dtype, const void* k_cache,
                                  const void* v_cache, DType kv_dtype,
                                  const int32_t* block_tables, const int32_t* context_lens,
                                  int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t head_dim, int64_t block_size,
                                  int64_t max_blocks_per_seq, float scale, void* out,
                                  DType out_dtype, void* workspace, int64_t workspace_bytes,
                                  cudaStream_t stream);

// Scratch that lets PagedDecodeAttention use its largest split count (kMaxAttentionSplits)
// for these shapes: f32 (max, sum, head_dim accumulators) per (seq, head, split).
inline constexpr int64_t kMaxAttentionSplits = 32;
int64_t PagedDecodeAttentionWorkspaceBytes(int64_t num_seqs, int64_t num_heads, int64_t head_dim);

}  // namespace sy::kernels::cuda
