// The MoE transformer forward pass (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), following the
// Hugging Face modeling files: pre-norm decoder layers, RoPE in the rotate-half (GPT-NeoX)
// layout HF checkpoints use, grouped-query attention over a paged KV cache, and the MoE block
// routed through the MoeDispatcher seam.
#include "model/moe_model.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "model/router.h"
#include "model/safetensors.h"

namespace sy::model {
namespace {

using kernels::ExpertWeights;
using kernels::WeightView;

WeightView ViewOf(const TensorView& t) {
  WeightView w;
  w.dtype = t.dtype;
  w.data = t.data;
  w.rows = t.shape.size() == 2 ? t.shape[0] : 1;
  w.cols = t.shape.empty() ? 1 : t.shape.back();
  w.row_stride = w.cols;
  return w;
}

std::vector<float> ToF32(const TensorView& t) {
  std::vector<float> out(t.numel());
  ConvertToF32(t.dtype, t.data, t.numel(), out.data());
  return out;
}

// One decoder layer's weights, views into the memory-mapped checkpoint in its dtype (bf16,
// f16 or f32). H = hidden_size, hd = head_dim, nh / nkv = attention / KV heads, E = experts,
// I = the expert's (or dense MLP's) intermediate size.
struct LayerWeights {
  WeightView input_norm, post_norm;           // [H]
  WeightView q, k, v;                         // [nh * hd, H], [nkv * hd, H], [nkv * hd, H]
  WeightView o;                               // [H, nh * hd]
  std::vector<float> q_bias, k_bias, v_bias;  // [nh * hd], [nkv * hd] x 2, f32; empty when absent
  WeightView q_norm, k_norm;                  // [hd] (kPerHead) or [nh * hd] / [nkv * hd] (kFull)
  bool is_moe = true;
  WeightView router;                          // [E, H]
  std::vector<ExpertWeights> experts;         // [E]: w1, w3 [I, H], w2 [H, I]; w1.data null: not loaded
  ExpertWeights shared;                       // Qwen2-MoE shared expert, or the dense MLP
  bool has_shared = false;
  WeightView shared_gate;                     // [1, H] (Qwen2-MoE)
};

class MoeModelImpl final : public MoeModel {
 public:
  absl::Status Init(const std::string& dir, const LoadOptions& options) {
    dir_ = dir;
    SY_ASSIGN_OR_RETURN(config_, ModelConfig::FromFile(dir + "/config.json"));
    SY_ASSIGN_OR_RETURN(backend_, kernels::MakeBackend(options.backend));
    SY_ASSIGN_OR_RETURN(reader_, CheckpointReader::Open(dir));
    const ModelConfig& c = config_;
    const int64_t H = c.hidden_size, hd = c.head_dim;
    auto get = [&](const std::string& name, std::vector<int64_t> shape) -> absl::StatusOr<TensorView> {
      auto t = reader_->Get(name, shape);
      if (t.ok()) params_ += t->numel();
      return t;
    };
    SY_ASSIGN_OR_RETURN(auto embed, get("model.embed_tokens.weight", {c.vocab_size, H}));
    embed_ = ViewOf(embed);
    SY_ASSIGN_OR_RETURN(auto norm, get("model.norm.weight", {H}));
    final_norm_ = ViewOf(norm);
    if (c.tie_word_embeddings && !reader_->Has("lm_head.weight")) {
      lm_head_ = embed_;
    } else {
      SY_ASSIGN_OR_RETURN(auto head, get("lm_head.weight", {c.vocab_size, H}));
      lm_head_ = ViewOf(head);
    }
    layers_.resize(c.num_layers);
    for (int64_t l = 0; l < c.num_layers; ++l) {
      LayerWeights& L = layers_[l];
      const std::string p = absl::StrCat("model.layers.", l, ".");
      SY_ASSIGN_OR_RETURN(auto in_norm, get(p + "input_layernorm.weight", {H}));
      L.input_norm = ViewOf(in_norm);
      SY_ASSIGN_OR_RETURN(auto post_norm, get(p + "post_attention_layernorm.weight", {H}));
      L.post_norm = ViewOf(post_norm);
      SY_ASSIGN_OR_RETURN(auto q, get(p + "self_attn.q_proj.weight", {c.num_heads * hd, H}));
      SY_ASSIGN_OR_RETURN(auto k, get(p + "self_attn.k_proj.weight", {c.num_kv_heads * hd, H}));
      SY_ASSIGN_OR_RETURN(auto v, get(p + "self_attn.v_proj.weight", {c.num_kv_heads * hd, H}));
      SY_ASSIGN_OR_RETURN(auto o, get(p + "self_attn.o_proj.weight", {H, c.num_heads * hd}));
      L.q = ViewOf(q);
      L.k = ViewOf(k);
      L.v = ViewOf(v);
      L.o = ViewOf(o);
      if (c.attention_bias) {
        SY_ASSIGN_OR_RETURN(auto qb, get(p + "self_attn.q_proj.bias", {c.num_heads * hd}));
        SY_ASSIGN_OR_RETURN(auto kb, get(p + "self_attn.k_proj.bias", {c.num_kv_heads * hd}));
        SY_ASSIGN_OR_RETURN(auto vb, get(p + "self_attn.v_proj.bias", {c.num_kv_heads * hd}));
        L.q_bias = ToF32(qb);
        L.k_bias = ToF32(kb);
        L.v_bias = ToF32(vb);
      }
      if (c.qk_norm != QkNorm::kNone) {
        const bool full = c.qk_norm == QkNorm::kFull;
        SY_ASSIGN_OR_RETURN(auto qn, get(p + "self_attn.q_norm.weight", {full ? c.num_heads * hd : hd}));
        SY_ASSIGN_OR_RETURN(auto kn, get(p + "self_attn.k_norm.weight", {full ? c.num_kv_heads * hd : hd}));
        L.q_norm = ViewOf(qn);
        L.k_norm = ViewOf(kn);
      }
      L.is_moe = c.IsMoeLayer(l);
      const bool mixtral = c.arch == Arch::kMixtral;
      const std::string moe = p + (mixtral ? "block_sparse_moe." : "mlp.");
      if (!L.is_moe) {
        SY_RETURN_IF_ERROR(LoadFfn(moe, "gate_proj", "up_proj", "down_proj", c.intermediate_size, &L.shared, get));
        L.has_shared = true;
        continue;
      }
      SY_ASSIGN_OR_RETURN(auto gate, get(moe + "gate.weight", {c.num_experts, H}));
      L.router = ViewOf(gate);
      L.experts.resize(c.num_experts);
      std::vector<bool> wanted(c.num_experts, options.experts_per_layer.empty());
      if (!options.experts_per_layer.empty()) {
        if (static_cast<int64_t>(options.experts_per_layer.size()) != c.num_layers)
          return absl::InvalidArgumentError("experts_per_layer must name every layer");
        for (int32_t e : options.experts_per_layer[l]) {
          if (e < 0 || e >= c.num_experts)
            return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": expert ", e, " out of range"));
          wanted[e] = true;
        }
      }
      for (int64_t e = 0; e < c.num_experts; ++e)
        if (wanted[e]) SY_RETURN_IF_ERROR(LoadExpert(l, e, &L.experts[e], get));
      if (c.arch == Arch::kQwen2Moe && c.shared_expert_intermediate_size > 0) {
        SY_RETURN_IF_ERROR(LoadFfn(moe + "shared_expert.", "gate_proj", "up_proj", "down_proj",
                                   c.shared_expert_intermediate_size, &L.shared, get));
        L.has_shared = true;
        SY_ASSIGN_OR_RETURN(auto sg, get(moe + "shared_expert_gate.weight", {1, H}));
        L.shared_gate = ViewOf(sg);
      }
    }
    single_rank_ = parallel::MakeSingleRankDispatcher(c.num_experts);
    dispatcher_ = single_rank_.get();
    return absl::OkStatus();
  }

  // Expert e of layer l, named as the architecture names it.
  template <typename Get>
  absl::Status LoadExpert(int64_t l, int64_t e, ExpertWeights* out, Get& get) {
    const bool mixtral = config_.arch == Arch::kMixtral;
    const std::string ep = absl::StrCat("model.layers.", l, ".",
                                        mixtral ? "block_sparse_moe." : "mlp.", "experts.", e, ".");
    return mixtral ? LoadFfn(ep, "w1", "w3", "w2", config_.moe_intermediate_size, out, get)
                   : LoadFfn(ep, "gate_proj", "up_proj", "down_proj", config_.moe_intermediate_size,
                             out, get);
  }

  template <typename Get>
  absl::Status LoadFfn(const std::string& prefix, const char* gate, const char* up, const char* down,
                       int64_t inter, ExpertWeights* out, Get& get) {
    const int64_t H = config_.hidden_size;
    SY_ASSIGN_OR_RETURN(auto g, get(absl::StrCat(prefix, gate, ".weight"), {inter, H}));
    SY_ASSIGN_OR_RETURN(auto u, get(absl::StrCat(prefix, up, ".weight"), {inter, H}));
    SY_ASSIGN_OR_RETURN(auto d, get(absl::StrCat(prefix, down, ".weight"), {H, inter}));
    out->w1 = ViewOf(g);
    out->w3 = ViewOf(u);
    out->w2 = ViewOf(d);
    return absl::OkStatus();
  }

  const ModelConfig& config() const override { return config_; }
  const std::string& dir() const override { return dir_; }
  int64_t NumParameters() const override { return params_; }

  int64_t DecodeBytesPerToken() const override {
    const ModelConfig& c = config_;
    auto bytes = [](const WeightView& w) { return w.rows * w.cols * DTypeSize(w.dtype); };
    auto ffn = [&](const ExpertWeights& e) { return bytes(e.w1) + bytes(e.w2) + bytes(e.w3); };
    int64_t total = bytes(lm_head_) + c.hidden_size * DTypeSize(embed_.dtype);
    for (const auto& L : layers_) {
      total += bytes(L.q) + bytes(L.k) + bytes(L.v) + bytes(L.o);
      if (L.has_shared) total += ffn(L.shared);
      if (L.is_moe) {
        total += bytes(L.router);
        for (const auto& e : L.experts)
          if (e.w1.data) {
            total += ffn(e) * c.num_experts_per_tok;  // k experts of this size per token
            break;
          }
      }
    }
    return total;
  }

  void SetLoadRecorder(parallel::ExpertLoadRecorder* r) override { recorder_ = r; }
  std::vector<int> MoeLayerIds() const override {
    std::vector<int> ids;
    for (size_t l = 0; l < layers_.size(); ++l)
      if (layers_[l].is_moe) ids.push_back(static_cast<int>(l));
    return ids;
  }

  void SetDispatcher(parallel::MoeDispatcher* d) override {
    dispatcher_ = d ? d : single_rank_.get();
  }
  parallel::MoeDispatcher* dispatcher() const override { return dispatcher_; }

  absl::Status CheckExpertLists(const std::vector<std::vector<int32_t>>& experts) const {
    if (experts.size() != layers_.size())
      return absl::InvalidArgumentError(absl::StrCat("expert lists name ", experts.size(),
                                                     " layers, the model has ", layers_.size()));
    for (size_t l = 0; l < experts.size(); ++l)
      for (int32_t e : experts[l])
        if (e < 0 || e >= config_.num_experts)
          return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": no expert ", e));
    return absl::OkStatus();
  }
  static int64_t ExpertBytes(const ExpertWeights& w) {
    auto bytes = [](const WeightView& v) { return v.rows * v.cols * DTypeSize(v.dtype); };
    return bytes(w.w1) + bytes(w.w2) + bytes(w.w3);
  }
  absl::StatusOr<int64_t> AddExperts(const std::vector<std::vector<int32_t>>& experts) override {
    SY_RETURN_IF_ERROR(CheckExpertLists(experts));
    auto get = [&](const std::string& name, std::vector<int64_t> shape) {
      return reader_->Get(name, shape);
    };
    int64_t added = 0;
    for (size_t l = 0; l < experts.size(); ++l) {
      if (!layers_[l].is_moe) continue;  // dense layer: nothing to load
      for (int32_t e : experts[l]) {
        ExpertWeights& w = layers_[l].experts[e];
        if (w.w1.data != nullptr) continue;
        ExpertWeights loaded;
        SY_RETURN_IF_ERROR(LoadExpert(static_cast<int64_t>(l), e, &loaded, get));
        w = loaded;
        added += ExpertBytes(w);
        // Ask the kernel to read the pages in now (asynchronous read-ahead), so the first
        // step that routes tokens here does not fault them in from disk one by one.
        for (const WeightView* v : {&w.w1, &w.w3, &w.w2}) {
          const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
          const uintptr_t begin = reinterpret_cast<uintptr_t>(v->data) & ~(page - 1);
          const uintptr_t end = reinterpret_cast<uintptr_t>(v->data) + v->rows * v->cols * DTypeSize(v->dtype);
          madvise(reinterpret_cast<void*>(begin), end - begin, MADV_WILLNEED);
        }
      }
    }
    return added;
  }
  absl::StatusOr<int64_t> RetainExperts(const std::vector<std::vector<int32_t>>& experts) override {
    SY_RETURN_IF_ERROR(CheckExpertLists(experts));
    int64_t dropped = 0;
    for (size_t l = 0; l < experts.size(); ++l) {
      if (!layers_[l].is_moe) continue;
      std::vector<bool> keep(config_.num_experts, false);
      for (int32_t e : experts[l]) keep[e] = true;
      for (int64_t e = 0; e < config_.num_experts; ++e) {
        ExpertWeights& w = layers_[l].experts[e];
        if (keep[e] || w.w1.data == nullptr) continue;
        dropped += ExpertBytes(w);
        w = ExpertWeights{};
      }
    }
    return dropped;
  }
  std::vector<int32_t> LoadedExperts(int layer) const override {
    std::vector<int32_t> out;
    if (layer < 0 || layer >= static_cast<int>(layers_.size())) return out;
    const auto& ex = layers_[layer].experts;
    for (size_t e = 0; e < ex.size(); ++e)
      if (ex[e].w1.data != nullptr) out.push_back(static_cast<int32_t>(e));
    return out;
  }

  absl::Status Forward(std::span<const SequenceInput> batch, KvCache& cache,
                       std::vector<float>* logits) override;
  ForwardTimes forward_times() const override {
    auto sec = [](const std::atomic<int64_t>& ns) { return static_cast<double>(ns.load()) * 1e-9; };
    ForwardTimes t;
    t.calls = calls_.load();
    t.total = sec(total_ns_);
    t.attention = sec(attention_ns_);
    t.moe = sec(moe_ns_);
    t.lm_head = sec(lm_head_ns_);
    return t;
  }

 private:
  // The parts of Forward, in order.
  absl::Status CheckBatch(std::span<const SequenceInput> batch, KvCache& cache,
                          int64_t* num_tokens, int64_t* num_logits) const;
  // The token rows into x_, and each token's position and KV cache slot.
  void Embed(std::span<const SequenceInput> batch, int64_t T, int64_t block_size);
  // Attention of layer l for the tokens [tb, te) of the batch (all of it, or one micro-batch).
  absl::Status Attention(int64_t l, std::span<const SequenceInput> batch, int64_t tb, int64_t te,
                         const kernels::PagedKv& kv);
  // The MoE (or dense MLP) block of layer l over all T tokens through the dispatcher.
  absl::Status MoeBlock(int64_t l, int64_t T, int* moe_index);
  // Its parts, for the tokens [tb, te): RMSNorm and router (top-k into topk_ids_ / topk_w_);
  // the experts over grouped rows (this rank's slots; a slot with rows whose expert is not
  // loaded is an error, its rows get zeros); the shared expert and the residual add.
  absl::Status MoeRoute(int64_t l, int64_t tb, int64_t te);
  absl::Status MoeExperts(int64_t l, const parallel::ExpertRows& rows);
  absl::Status MoeTail(int64_t l, int64_t tb, int64_t te);
  // A dense MLP layer's block for the tokens [tb, te).
  absl::Status DenseMlp(int64_t l, int64_t tb, int64_t te);
  // Forward's layers as two micro-batches (the dispatcher's micro_batches() == 2).
  absl::Status LayersOverlapped(std::span<const SequenceInput> batch, int64_t T, KvCache& cache);
  absl::Status LmHead(std::span<const SequenceInput> batch, int64_t num_logits, float* logits);

  absl::Status Ffn(const ExpertWeights& w, const float* x, int64_t rows, float* y) {
    const int64_t offsets[2] = {0, rows};
    const ExpertWeights* e = &w;
    return backend_->GroupedExpertFfn(x, offsets, 1, &e, config_.hidden_size, y);
  }

  ModelConfig config_;
  std::string dir_;
  std::unique_ptr<kernels::Backend> backend_;
  std::unique_ptr<CheckpointReader> reader_;
  WeightView embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  std::unique_ptr<parallel::MoeDispatcher> single_rank_;
  parallel::MoeDispatcher* dispatcher_ = nullptr;
  parallel::ExpertLoadRecorder* recorder_ = nullptr;
  int64_t params_ = 0;
  // Scratch, grown and reused across steps, all f32 (T = tokens of the step, L = sequences
  // that want logits; H, hd, nh, nkv, E, K as in LayerWeights).
  std::vector<float> x_;              // [T, H] the residual stream
  std::vector<float> h_;              // [T, H] x_ after the layer's RMSNorm
  std::vector<float> q_;              // [T, nh * hd]
  std::vector<float> k_, v_;          // [T, nkv * hd] this step's K and V (then in the cache)
  std::vector<float> attn_;           // [T, nh * hd] attention output, before o
  std::vector<float> o_;              // [T, H]
  std::vector<float> router_logits_;  // [T, E]
  std::vector<int32_t> topk_ids_;     // [T, K]
  std::vector<float> topk_w_;         // [T, K]
  std::vector<float> moe_out_;        // [T, H] the MoE (or MLP) output
  std::vector<float> shared_out_;     // [T, H] the shared expert's output (Qwen2-MoE)
  std::vector<float> gate_;           // [T] the shared expert's gate logit
  std::vector<int32_t> positions_;    // [T] each token's position in its sequence
  std::vector<int64_t> slots_;        // [T] each token's KV cache slot (block · block_size + row)
  std::vector<float> last_;           // [L, H] the last hidden state of each such sequence
  std::vector<kernels::AttentionSeq> attn_seqs_;    // one layer's batched attention call
  std::vector<const ExpertWeights*> slot_experts_;  // [local slots] of the layer
  parallel::ExpertRowsMerger merger_;                // both micro-batches' rows (overlap)
  // forward_times(), in nanoseconds (written by Forward, read by any thread).
  std::atomic<int64_t> calls_{0}, total_ns_{0}, attention_ns_{0}, moe_ns_{0}, lm_head_ns_{0};
};

// The forward pass over a batch of sequences, flattened to T tokens: embed, then per layer
// Attention and MoeBlock (each adds its output to the residual stream x_), then LmHead on
// the last token of each sequence that wants logits.
absl::Status MoeModelImpl::Forward(std::span<const SequenceInput> batch, KvCache& cache,
                                   std::vector<float>* logits) {
  const ModelConfig& c = config_;
  int64_t T = 0, num_logits = 0;
  SY_RETURN_IF_ERROR(CheckBatch(batch, cache, &T, &num_logits));
  using Clock = std::chrono::steady_clock;
  auto add = [](std::atomic<int64_t>& to, Clock::time_point from, Clock::time_point until) {
    to += std::chrono::duration_cast<std::chrono::nanoseconds>(until - from).count();
  };
  const Clock::time_point start = Clock::now();
  logits->assign(num_logits * c.vocab_size, 0.f);
  Embed(batch, T, cache.block_size());
  if (dispatcher_->micro_batches() == 2) {
    SY_RETURN_IF_ERROR(LayersOverlapped(batch, T, cache));
  } else {
    int moe_index = 0;  // index of this MoE layer among the MoE layers (load statistics)
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const Clock::time_point t0 = Clock::now();
      SY_RETURN_IF_ERROR(Attention(l, batch, 0, T, cache.layer(l)));
      const Clock::time_point t1 = Clock::now();
      absl::Status moe = MoeBlock(l, T, &moe_index);
      add(moe_ns_, t1, Clock::now());
      add(attention_ns_, t0, t1);
      SY_RETURN_IF_ERROR(moe);
    }
  }
  if (recorder_ != nullptr) recorder_->EndStep();
  const Clock::time_point head = Clock::now();
  SY_RETURN_IF_ERROR(LmHead(batch, num_logits, logits->data()));
  const Clock::time_point end = Clock::now();
  add(lm_head_ns_, head, end);
  add(total_ns_, start, end);
  ++calls_;
  return absl::OkStatus();
}

absl::Status MoeModelImpl::CheckBatch(std::span<const SequenceInput> batch, KvCache& cache,
                                      int64_t* num_tokens, int64_t* num_logits) const {
  const ModelConfig& c = config_;
  int64_t T = 0, n_logits = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SequenceInput& in = batch[s];
    const int64_t end = in.start_pos + static_cast<int64_t>(in.tokens.size());
    if (end > c.max_position_embeddings)
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s, ": position ", end - 1,
                                                     " is past max_position_embeddings ",
                                                     c.max_position_embeddings));
    const int64_t blocks_needed = (end + cache.block_size() - 1) / cache.block_size();
    if (static_cast<int64_t>(in.block_table.size()) < blocks_needed)
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s, ": block table holds ",
                                                     in.block_table.size(), " blocks, ", end,
                                                     " positions need ", blocks_needed));
    for (int64_t b = 0; b < blocks_needed; ++b)
      if (in.block_table[b] < 0 || in.block_table[b] >= cache.num_blocks())
        return absl::InvalidArgumentError(absl::StrCat("sequence ", s, ": block id ", in.block_table[b],
                                                       " out of range"));
    for (int32_t t : in.tokens)
      if (t < 0 || t >= c.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " is outside the vocabulary [0, ",
                                                       c.vocab_size, ")"));
    T += static_cast<int64_t>(in.tokens.size());
    if (in.compute_logits && !in.tokens.empty()) ++n_logits;
  }
  *num_tokens = T;
  *num_logits = n_logits;
  return absl::OkStatus();
}

void MoeModelImpl::Embed(std::span<const SequenceInput> batch, int64_t T, int64_t block_size) {
  const int64_t H = config_.hidden_size;
  const int64_t qdim = config_.num_heads * config_.head_dim;
  const int64_t kvdim = config_.num_kv_heads * config_.head_dim;
  x_.resize(T * H);
  h_.resize(T * H);
  q_.resize(T * qdim);
  k_.resize(T * kvdim);
  v_.resize(T * kvdim);
  attn_.resize(T * qdim);
  o_.resize(T * H);
  moe_out_.resize(T * H);
  positions_.resize(T);
  slots_.resize(T);
  int64_t t = 0;
  for (const auto& in : batch)
    for (size_t i = 0; i < in.tokens.size(); ++i, ++t) {
      ConvertToF32(embed_.dtype, embed_.row(in.tokens[i]), H, &x_[t * H]);
      const int64_t pos = in.start_pos + static_cast<int64_t>(i);
      positions_[t] = static_cast<int32_t>(pos);
      slots_[t] = static_cast<int64_t>(in.block_table[pos / block_size]) * block_size + pos % block_size;
    }
}

absl::Status MoeModelImpl::Attention(int64_t l, std::span<const SequenceInput> batch, int64_t tb,
                                     int64_t te, const kernels::PagedKv& kv) {
  const ModelConfig& c = config_;
  const LayerWeights& L = layers_[l];
  const int64_t H = c.hidden_size, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const int64_t qdim = nh * hd, kvdim = nkv * hd;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t T = te - tb;
  if (T <= 0) return absl::OkStatus();
  float* x = &x_[tb * H];
  float* h = &h_[tb * H];
  float* q = &q_[tb * qdim];
  float* k = &k_[tb * kvdim];
  float* v = &v_[tb * kvdim];
  float* attn = &attn_[tb * qdim];
  float* o = &o_[tb * H];
  SY_RETURN_IF_ERROR(backend_->RmsNorm(x, T, H, L.input_norm, eps, h));
  SY_RETURN_IF_ERROR(backend_->MatMul(h, T, L.q, q, L.q_bias.empty() ? nullptr : L.q_bias.data()));
  SY_RETURN_IF_ERROR(backend_->MatMul(h, T, L.k, k, L.k_bias.empty() ? nullptr : L.k_bias.data()));
  SY_RETURN_IF_ERROR(backend_->MatMul(h, T, L.v, v, L.v_bias.empty() ? nullptr : L.v_bias.data()));
  if (c.qk_norm == QkNorm::kFull) {
    SY_RETURN_IF_ERROR(backend_->RmsNorm(q, T, qdim, L.q_norm, eps, q));
    SY_RETURN_IF_ERROR(backend_->RmsNorm(k, T, kvdim, L.k_norm, eps, k));
  } else if (c.qk_norm == QkNorm::kPerHead) {
    SY_RETURN_IF_ERROR(backend_->RmsNorm(q, T * nh, hd, L.q_norm, eps, q));
    SY_RETURN_IF_ERROR(backend_->RmsNorm(k, T * nkv, hd, L.k_norm, eps, k));
  }
  if (c.clip_qkv > 0) {
    const float lim = static_cast<float>(c.clip_qkv);
    for (float* buf : {q, k, v}) {
      const int64_t n = T * (buf == q ? qdim : kvdim);
      for (int64_t i = 0; i < n; ++i) buf[i] = std::clamp(buf[i], -lim, lim);
    }
  }
  // RoPE on q and k, and this layer's K/V of every new token into the paged cache.
  SY_RETURN_IF_ERROR(backend_->ApplyRope(q, k, T, nh, nkv, hd, &positions_[tb], c.rope_theta));
  SY_RETURN_IF_ERROR(backend_->WriteKv(k, v, T, &slots_[tb], kv));
  // The part of each sequence in [tb, te): its queries attend to every position up to theirs
  // (a micro-batch that starts inside a sequence reads the earlier part's K/V, which the other
  // micro-batch wrote to the cache first).
  attn_seqs_.clear();
  int64_t t0 = 0;
  for (const auto& in : batch) {
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    const int64_t b = std::max(t0, tb), e = std::min(t0 + n, te);
    if (e > b)
      attn_seqs_.push_back({&q_[b * qdim], e - b, in.start_pos + (b - t0), in.block_table.data(),
                            &attn_[b * qdim]});
    t0 += n;
  }
  // Every sequence's K/V of this layer is written: one attention call for the batch.
  SY_RETURN_IF_ERROR(backend_->AttentionBatch(
      attn_seqs_.data(), static_cast<int64_t>(attn_seqs_.size()), nh, kv,
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)))));
  SY_RETURN_IF_ERROR(backend_->MatMul(attn, T, L.o, o));
  for (int64_t i = 0; i < T * H; ++i) x[i] += o[i];
  return absl::OkStatus();
}

absl::Status MoeModelImpl::MoeBlock(int64_t l, int64_t T, int* moe_index) {
  const LayerWeights& L = layers_[l];
  if (!L.is_moe) return DenseMlp(l, 0, T);
  SY_RETURN_IF_ERROR(MoeRoute(l, 0, T));
  if (recorder_ != nullptr) recorder_->Record(*moe_index, topk_ids_.data(), T);
  ++*moe_index;
  const int64_t H = config_.hidden_size, K = config_.num_experts_per_tok;
  // Dispatch: the rows this rank's experts compute, grouped by local slot.
  parallel::ExpertRows rows;
  SY_RETURN_IF_ERROR(dispatcher_->Dispatch(static_cast<int>(l), h_.data(), T, H, topk_ids_.data(),
                                           topk_w_.data(), K, &rows));
  // Experts; an error is reported after the combine (the other ranks still finish the
  // layer's collectives).
  const absl::Status missing = MoeExperts(l, rows);
  // Combine: Σ_k weight · expert output back into each token's row.
  SY_RETURN_IF_ERROR(dispatcher_->Combine(static_cast<int>(l), moe_out_.data()));
  SY_RETURN_IF_ERROR(missing);
  return MoeTail(l, 0, T);
}

absl::Status MoeModelImpl::DenseMlp(int64_t l, int64_t tb, int64_t te) {
  const ModelConfig& c = config_;
  const LayerWeights& L = layers_[l];
  const int64_t H = c.hidden_size, T = te - tb;
  if (T <= 0) return absl::OkStatus();
  SY_RETURN_IF_ERROR(backend_->RmsNorm(&x_[tb * H], T, H, L.post_norm,
                                       static_cast<float>(c.rms_norm_eps), &h_[tb * H]));
  SY_RETURN_IF_ERROR(Ffn(L.shared, &h_[tb * H], T, &moe_out_[tb * H]));
  for (int64_t i = tb * H; i < te * H; ++i) x_[i] += moe_out_[i];
  return absl::OkStatus();
}

absl::Status MoeModelImpl::MoeRoute(int64_t l, int64_t tb, int64_t te) {
  const ModelConfig& c = config_;
  const LayerWeights& L = layers_[l];
  const int64_t H = c.hidden_size, E = c.num_experts, K = c.num_experts_per_tok;
  const int64_t T = te - tb, all = static_cast<int64_t>(x_.size()) / H;
  router_logits_.resize(all * E);
  topk_ids_.resize(all * K);
  topk_w_.resize(all * K);
  if (T <= 0) return absl::OkStatus();
  SY_RETURN_IF_ERROR(backend_->RmsNorm(&x_[tb * H], T, H, L.post_norm,
                                       static_cast<float>(c.rms_norm_eps), &h_[tb * H]));
  // Router: the top-k experts of each token and their weights.
  SY_RETURN_IF_ERROR(backend_->MatMul(&h_[tb * H], T, L.router, &router_logits_[tb * E]));
  RouteTopK(&router_logits_[tb * E], T, E, K, c.norm_topk_prob, &topk_ids_[tb * K],
            &topk_w_[tb * K]);
  return absl::OkStatus();
}

absl::Status MoeModelImpl::MoeExperts(int64_t l, const parallel::ExpertRows& rows) {
  const LayerWeights& L = layers_[l];
  const int64_t H = config_.hidden_size;
  const int64_t slots = dispatcher_->num_local_slots(static_cast<int>(l));
  slot_experts_.assign(slots, nullptr);
  absl::Status missing;
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t e = dispatcher_->local_slot_expert(static_cast<int>(l), s);
    if (e >= 0 && L.experts[e].w1.data != nullptr) slot_experts_[s] = &L.experts[e];
    if (slot_experts_[s] == nullptr && rows.slot_offsets[s + 1] > rows.slot_offsets[s] && missing.ok())
      missing = absl::FailedPreconditionError(absl::StrCat(
          "layer ", l, " slot ", s, " (expert ", e, ") has rows but is not loaded"));
  }
  if (missing.ok() && rows.num_rows > 0)
    missing = backend_->GroupedExpertFfnRows({rows.row_ptrs, rows.row_bf16}, rows.slot_offsets,
                                             slots, slot_experts_.data(), H, rows.out);
  if (!missing.ok()) std::fill(rows.out, rows.out + rows.num_rows * H, 0.f);
  return missing;
}

absl::Status MoeModelImpl::MoeTail(int64_t l, int64_t tb, int64_t te) {
  const LayerWeights& L = layers_[l];
  const int64_t H = config_.hidden_size, T = te - tb;
  if (T <= 0) return absl::OkStatus();
  if (L.has_shared) {  // Qwen2-MoE: + sigmoid(gate . h) * shared_expert(h)
    const int64_t all = static_cast<int64_t>(x_.size()) / H;
    shared_out_.resize(all * H);
    gate_.resize(all);
    SY_RETURN_IF_ERROR(Ffn(L.shared, &h_[tb * H], T, &shared_out_[tb * H]));
    SY_RETURN_IF_ERROR(backend_->MatMul(&h_[tb * H], T, L.shared_gate, &gate_[tb]));
    SY_RETURN_IF_ERROR(
        backend_->AddGated(&shared_out_[tb * H], &gate_[tb], T, H, &moe_out_[tb * H]));
  }
  for (int64_t i = tb * H; i < te * H; ++i) x_[i] += moe_out_[i];
  return absl::OkStatus();
}

// Two micro-batches, lane 0 = tokens [0, Ta) and lane 1 = [Ta, T) (a split may fall inside a
// sequence). Per MoE layer, with at most one exchange in flight:
//   attention(0)            ‖ lane 1's return of the previous layer
//   finish that return; lane 1's tail of the previous layer
//   route(0), start dispatch(0)
//   attention(1)            ‖ lane 0's dispatch
//   finish dispatch(0); route(1), dispatch(1)
//   experts over both lanes' rows (each expert's weights read once)
//   combine(0); lane 0's tail
//   start combine(1)        ‖ the next layer's attention(0)
// Every rank runs this sequence whatever its token count (empty lanes included).
absl::Status MoeModelImpl::LayersOverlapped(std::span<const SequenceInput> batch, int64_t T,
                                            KvCache& cache) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, K = c.num_experts_per_tok, Ta = T / 2;
  using Clock = std::chrono::steady_clock;
  auto ns = [](Clock::time_point from, Clock::time_point until) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(until - from).count();
  };
  int moe_index = 0;
  int returning = -1;  // the layer whose lane-1 return is in flight
  auto finish_return = [&]() -> absl::Status {
    if (returning < 0) return absl::OkStatus();
    const int layer = returning;
    returning = -1;
    SY_RETURN_IF_ERROR(dispatcher_->FinishCombine(1, layer, &moe_out_[Ta * H]));
    return MoeTail(layer, Ta, T);
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = layers_[l];
    const int layer = static_cast<int>(l);
    const Clock::time_point t0 = Clock::now();
    SY_RETURN_IF_ERROR(Attention(l, batch, 0, Ta, cache.layer(l)));
    int64_t attention = ns(t0, Clock::now());
    SY_RETURN_IF_ERROR(finish_return());
    if (!L.is_moe) {  // no exchange in a dense layer
      SY_RETURN_IF_ERROR(DenseMlp(l, 0, Ta));
      const Clock::time_point t1 = Clock::now();
      SY_RETURN_IF_ERROR(Attention(l, batch, Ta, T, cache.layer(l)));
      attention += ns(t1, Clock::now());
      SY_RETURN_IF_ERROR(DenseMlp(l, Ta, T));
    } else {
      SY_RETURN_IF_ERROR(MoeRoute(l, 0, Ta));
      SY_RETURN_IF_ERROR(dispatcher_->StartDispatch(0, layer, h_.data(), Ta, H, topk_ids_.data(),
                                                    topk_w_.data(), K));
      const Clock::time_point t1 = Clock::now();
      SY_RETURN_IF_ERROR(Attention(l, batch, Ta, T, cache.layer(l)));
      attention += ns(t1, Clock::now());
      parallel::ExpertRows rows0, rows1, rows;
      SY_RETURN_IF_ERROR(dispatcher_->FinishDispatch(0, &rows0));
      SY_RETURN_IF_ERROR(MoeRoute(l, Ta, T));
      if (recorder_ != nullptr) recorder_->Record(moe_index, topk_ids_.data(), T);
      ++moe_index;
      SY_RETURN_IF_ERROR(dispatcher_->StartDispatch(1, layer, &h_[Ta * H], T - Ta, H,
                                                    &topk_ids_[Ta * K], &topk_w_[Ta * K], K));
      SY_RETURN_IF_ERROR(dispatcher_->FinishDispatch(1, &rows1));
      merger_.Merge(rows0, rows1, dispatcher_->num_local_slots(layer), H, &rows);
      const absl::Status missing = MoeExperts(l, rows);
      merger_.Split(rows0, rows1);
      // A failed lane-0 combine that is not the group's failure (a routing error) still lets
      // lane 1's exchanges run on every rank before it is reported.
      SY_RETURN_IF_ERROR(dispatcher_->StartCombine(0, layer, moe_out_.data()));
      const absl::Status combined = dispatcher_->FinishCombine(0, layer, moe_out_.data());
      if (absl::IsUnavailable(combined)) return combined;
      SY_RETURN_IF_ERROR(dispatcher_->StartCombine(1, layer, &moe_out_[Ta * H]));
      returning = layer;
      if (!combined.ok() || !missing.ok()) {
        finish_return().IgnoreError();
        return !combined.ok() ? combined : missing;
      }
      SY_RETURN_IF_ERROR(MoeTail(l, 0, Ta));
    }
    attention_ns_ += attention;
    moe_ns_ += ns(t0, Clock::now()) - attention;
  }
  return finish_return();
}

absl::Status MoeModelImpl::LmHead(std::span<const SequenceInput> batch, int64_t num_logits,
                                  float* logits) {
  if (num_logits == 0) return absl::OkStatus();
  const int64_t H = config_.hidden_size;
  last_.resize(num_logits * H);
  int64_t t = 0, j = 0;
  for (const auto& in : batch) {
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    if (in.compute_logits && n > 0) {
      std::memcpy(&last_[j * H], &x_[(t + n - 1) * H], H * sizeof(float));
      ++j;
    }
    t += n;
  }
  SY_RETURN_IF_ERROR(backend_->RmsNorm(last_.data(), num_logits, H, final_norm_,
                                       static_cast<float>(config_.rms_norm_eps), last_.data()));
  return backend_->MatMul(last_.data(), num_logits, lm_head_, logits);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MoeModel>> MoeModel::Load(const std::string& dir,
                                                         const LoadOptions& options) {
  auto m = std::make_unique<MoeModelImpl>();
  absl::Status s = m->Init(dir, options);
  if (!s.ok()) return Annotate(s, absl::StrCat("loading checkpoint ", dir));
  return std::unique_ptr<MoeModel>(std::move(m));
}

}  // namespace sy::model
