// Backend: the seam between the model and its compute kernels (DESIGN.md §1).
//
// The model (model/) calls only these functions for its heavy math; `ReferenceBackend` is the
// plain, obviously-correct implementation every fast kernel is tested against, and fast
// backends (AVX-512 on CPU, CUDA) implement the same interface. Activations are f32,
// row-major; weights stay in their checkpoint dtype (memory-mapped, never copied) and are
// described by WeightView. Every method returns a status: the CPU backends always succeed; a
// device backend reports a failed launch or allocation, and the model fails the step.
//
// Thread safety: a Backend is stateless apart from scratch space; one engine thread calls it.
// Implementations may parallelise internally on ThreadPool::Default().
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/core/dtype.h"

namespace sy::kernels {

// A weight matrix as HF stores a Linear: [rows = out_features, cols = in_features],
// row-major, `dtype`, `row_stride` elements between rows (== cols when packed).
struct WeightView {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;

  const uint8_t* row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + r * row_stride * DTypeSize(dtype);
  }
};

// One expert's SwiGLU FFN: y = w2 · (silu(w1 · x) ⊙ (w3 · x)).
struct ExpertWeights {
  WeightView w1;  // gate_proj [inter, hidden]
  WeightView w3;  // up_proj   [inter, hidden]
  WeightView w2;  // down_proj [hidden, inter]
};

// Paged attention over one sequence's KV cache.
// The cache of one layer is two arrays (K and V) of [num_blocks, block_size, num_kv_heads,
// head_dim] f32; a sequence's logical position p lives in block block_table[p / block_size],
// row p % block_size.
struct PagedKv {
  float* k = nullptr;
  float* v = nullptr;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_blocks = 0;  // 0: not stated (a device backend then keeps this cache on the CPU)
};

// One sequence of a batched attention call (Backend::AttentionBatch).
struct AttentionSeq {
  const float* q = nullptr;             // [num_new, num_heads, head_dim] f32
  int64_t num_new = 0;                  // new positions start_pos .. start_pos + num_new - 1
  int64_t start_pos = 0;
  const int32_t* block_table = nullptr;  // this sequence's blocks in the shared cache
  float* out = nullptr;                 // [num_new, num_heads, head_dim] f32
};

// Rows given by address (Backend::GroupedExpertFfnRows).
struct RowList {
  const void* const* rows = nullptr;  // per row: `hidden` values, f32 or bf16
  const uint8_t* bf16 = nullptr;      // per row: 1 = bf16; nullptr: every row f32
};

// Rows [first, first + count) of x as f32 into dst [count, hidden] (bf16 rows widened).
void GatherRowsF32(const RowList& x, int64_t first, int64_t count, int64_t hidden, float* dst);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // y[T, N] = x[T, K] · W[N, K]^T  (x, y f32; W.cols == K, W.rows == N).
  // Overwrites y. If bias != nullptr (f32 [N]) it is added.
  virtual absl::Status MatMul(const float* x, int64_t num_tokens, const WeightView& w, float* y,
                      const float* bias = nullptr) = 0;

  // y[t] = x[t] / rms(x[t]) * weight, rms = sqrt(mean(x^2) + eps). x may equal y.
  // weight: [dim] in its dtype.
  virtual absl::Status RmsNorm(const float* x, int64_t num_rows, int64_t dim, const WeightView& weight,
                       float eps, float* y) = 0;

  // Grouped expert FFN: rows [offsets[g], offsets[g+1]) of x (f32 [R, hidden]) go through
  // experts[g]; results to y (f32 [R, hidden], overwritten). num_groups experts; empty groups
  // allowed. experts[g] may be null only when its group is empty.
  virtual absl::Status GroupedExpertFfn(const float* x, const int64_t* offsets, int64_t num_groups,
                                const ExpertWeights* const* experts, int64_t hidden, float* y) = 0;

  // The same with the input rows given by address (the expert dispatcher's rows stay where
  // they arrived: in the token rows, or in a receive buffer in bf16): row i of
  // [offsets[0], offsets[num_groups]) is x.rows[i], `hidden` f32 values, or bf16 values where
  // x.bf16 != nullptr and x.bf16[i] != 0. y as above. Default: gathers the rows into f32 on
  // the calling thread and calls GroupedExpertFfn.
  virtual absl::Status GroupedExpertFfnRows(const RowList& x, const int64_t* offsets,
                                            int64_t num_groups,
                                            const ExpertWeights* const* experts, int64_t hidden,
                                            float* y);

  // Causal attention for one sequence: q [num_new, num_heads, head_dim] f32 for positions
  // start_pos .. start_pos+num_new-1, whose K/V are already written in `kv`; keys 0 ..
  // start_pos+num_new-1. out [num_new, num_heads, head_dim]. GQA: head h reads KV head
  // h / (num_heads / num_kv_heads). scale = 1/sqrt(head_dim) unless given.
  virtual absl::Status Attention(const float* q, int64_t num_new, int64_t start_pos, int64_t num_heads,
                         const PagedKv& kv, const int32_t* block_table, float scale,
                         float* out) = 0;

  // Rotary position embedding, rotate-half (HF `rotate_half`), in place on q and k: for pair
  // i < head_dim / 2 of every head of token t, angle = positions[t] · theta^(-2i / head_dim)
  // (in double), v[i] = v[i]·cos − v[i+half]·sin, v[i+half] = v[i+half]·cos + v[i]·sin.
  //   q: f32 [num_tokens, num_heads, head_dim]; k: f32 [num_tokens, num_kv_heads, head_dim].
  // Default: plain loops on the calling thread (kernels/backend.cc).
  virtual absl::Status ApplyRope(float* q, float* k, int64_t num_tokens, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, const int32_t* positions,
                         double theta);

  // This step's K and V rows into the paged cache (vLLM's slot mapping): token t's rows go to
  // slot slots[t] = block · block_size + row. k, v: f32 [num_tokens, num_kv_heads · head_dim].
  // Default: copies on the calling thread.
  virtual absl::Status WriteKv(const float* k, const float* v, int64_t num_tokens, const int64_t* slots,
                       const PagedKv& kv);

  // y[t] += sigmoid(gate[t]) · x[t] for rows of `dim` (Qwen2-MoE's gated shared expert).
  // x, y: f32 [num_rows, dim]; gate: f32 [num_rows]. Default: loops on the calling thread.
  virtual absl::Status AddGated(const float* x, const float* gate, int64_t num_rows, int64_t dim,
                        float* y);

  // Attention for several sequences of one layer's cache at once: the same results as
  // Attention on each. A threaded backend runs them as one parallel region (a decode step of
  // 32 sequences is otherwise 32 small regions per layer). Default: Attention per sequence.
  virtual absl::Status AttentionBatch(const AttentionSeq* seqs, int64_t num_seqs, int64_t num_heads,
                              const PagedKv& kv, float scale) {
    for (int64_t s = 0; s < num_seqs; ++s) {
      const AttentionSeq& a = seqs[s];
      if (a.num_new <= 0) continue;
      absl::Status st =
          Attention(a.q, a.num_new, a.start_pos, num_heads, kv, a.block_table, scale, a.out);
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  }
};

// The plain reference kernels (kernels/cpu/reference_backend.cc).
std::unique_ptr<Backend> MakeReferenceBackend();

// The fastest backend available on this machine for `name` ("reference", "cpu"; "auto"
// picks the best CPU backend). InvalidArgument for an unknown name.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name);

// Shared scalar helpers (also used by reference kernels).
// Dot product of a weight row (dtype) with f32 x, accumulated in f32.
float DotRow(const WeightView& w, int64_t row, const float* x);

}  // namespace sy::kernels
