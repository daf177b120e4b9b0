// Engine benchmark: the `bench` preset (Mixtral-shaped, ~0.64 B parameters)
// on this machine: prefill tokens/s at 128 and 512 tokens, and decode tokens/s at batch 1, 4,
// 16 and 32 after 128-token prompts, beside llama.cpp's figures on the same shapes and the
// batch-1 memory roofline from the bandwidth measured in the same run, and for every larger
// batch the limit of that batch: per decode step, the bytes it must read (the weights every
// token uses, each expert touched in the step once, the KV cache) over the same-run bandwidth,
// or its FLOPs over the same-run rate of our GEMM on a compute-bound shape, whichever is
// slower.
//
//   model_bench [--model DIR] [--dtype bf16|f32] [--threads 2] [--backend auto]
//               [--reps 3] [--decode-steps 16] [--only prefill|decode]
//
// Without --model it writes the bench checkpoint once to $SWITCHYARD_CACHE/bench-mixtral-<dtype>
// (default ~/.cache/switchyard). Checks: logits are finite, and at every batch size the logits
// of sequence 0 (teacher-forced with the same tokens) match the batch-1 run.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "kernels/backend.h"
#include "kernels/core/thread_pool.h"
#include "parallel/expert_load.h"
#include "model/moe_model.h"
#include "model/synthetic.h"
#include "server/flags.h"

namespace sy::bench {
namespace {

std::vector<int32_t> Tokens(int64_t n, int64_t vocab, int64_t salt) {
  std::vector<int32_t> t(n);
  uint64_t x = 0x9E3779B97F4A7C15ull * (salt + 1);
  for (int64_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    t[i] = static_cast<int32_t>(3 + x % (vocab - 3));
  }
  t[0] = 1;
  return t;
}

bool AllFinite(const std::vector<float>& v) {
  for (float f : v)
    if (!std::isfinite(f)) return false;
  return true;
}

struct Failure {
  std::string what;
};

// Prefill of `len` tokens in one step; returns seconds.
double TimePrefill(model::MoeModel& m, int64_t len, std::vector<Failure>* fails) {
  const int64_t bs = 16, nb = (len + bs - 1) / bs;
  model::KvCache cache(m.config(), nb, bs);
  std::vector<int32_t> blocks(nb);
  for (int64_t i = 0; i < nb; ++i) blocks[i] = static_cast<int32_t>(i);
  auto toks = Tokens(len, m.config().vocab_size, len);
  model::SequenceInput in;
  in.tokens = toks;
  in.block_table = blocks;
  std::vector<float> logits;
  const double t0 = Seconds();
  auto s = m.Forward(std::span<const model::SequenceInput>(&in, 1), cache, &logits);
  const double dt = Seconds() - t0;
  if (!s.ok() || !AllFinite(logits)) fails->push_back({"prefill " + std::to_string(len) + ": " + s.ToString()});
  return dt;
}

// `batch` sequences with 128-token prompts, then `steps` decode steps with fixed
// (teacher-forced) tokens. Returns decode seconds; fills `seq0_logits` with sequence 0's
// logits of the last step.
double TimeDecode(model::MoeModel& m, int64_t batch, int64_t steps, std::vector<float>* seq0_logits,
                  std::vector<Failure>* fails) {
  const auto& c = m.config();
  const int64_t prompt = 128, bs = 16, per_seq = (prompt + steps + 1 + bs - 1) / bs;
  model::KvCache cache(c, per_seq * batch, bs);
  std::vector<std::vector<int32_t>> tables(batch), prompts(batch), feeds(batch);
  for (int64_t s = 0; s < batch; ++s) {
    for (int64_t b = 0; b < per_seq; ++b) tables[s].push_back(static_cast<int32_t>(s * per_seq + b));
    prompts[s] = Tokens(prompt, c.vocab_size, 1000 + s);
    feeds[s] = Tokens(steps + 1, c.vocab_size, 5000 + s);
  }
  std::vector<float> logits;
  // Prefill, a few sequences at a time (untimed).
  for (int64_t s0 = 0; s0 < batch; s0 += 8) {
    std::vector<model::SequenceInput> in;
    for (int64_t s = s0; s < std::min(batch, s0 + 8); ++s) {
      model::SequenceInput x;
      x.tokens = prompts[s];
      x.block_table = tables[s];
      in.push_back(x);
    }
    auto st = m.Forward(in, cache, &logits);
    if (!st.ok()) fails->push_back({"decode prefill: " + st.ToString()});
  }
  auto step = [&](int64_t i) {
    std::vector<model::SequenceInput> in(batch);
    for (int64_t s = 0; s < batch; ++s) {
      in[s].tokens = std::span<const int32_t>(&feeds[s][i], 1);
      in[s].start_pos = prompt + i;
      in[s].block_table = tables[s];
    }
    auto st = m.Forward(in, cache, &logits);
    if (!st.ok()) fails->push_back({"decode step: " + st.ToString()});
  };
  step(0);  // warm-up
  const double t0 = Seconds();
  for (int64_t i = 1; i <= steps; ++i) step(i);
  const double dt = Seconds() - t0;
  if (!AllFinite(logits)) fails->push_back({"decode batch " + std::to_string(batch) + ": non-finite logits"});
  seq0_logits->assign(logits.begin(), logits.begin() + c.vocab_size);
  return dt;
}

// FLOP/s of the backend's MatMul on a shape that is compute-bound here: 256 rows through a
// 1024 x 1024 weight of `dtype` that stays in cache. The compute ceiling of the limit line.
double MeasureGemmFlops(const std::string& backend_name, DType dtype) {
  auto backend = kernels::MakeBackend(backend_name);
  if (!backend.ok()) return 0;
  const int64_t T = 256, N = 1024, K = 1024;
  std::vector<float> x(T * K), y(T * N), wf(N * K);
  std::vector<uint16_t> wb(N * K);
  for (int64_t i = 0; i < T * K; ++i) x[i] = std::sin(0.01 * i);
  for (int64_t i = 0; i < N * K; ++i) {
    wf[i] = 0.01f * std::cos(0.37 * i);
    wb[i] = F32ToBf16(wf[i]);
  }
  kernels::WeightView w;
  w.dtype = dtype;
  w.data = dtype == DType::kF32 ? static_cast<const void*>(wf.data()) : wb.data();
  w.rows = N;
  w.cols = K;
  std::vector<double> t;
  for (int r = 0; r < 13; ++r) {
    const double t0 = Seconds();
    if (!(*backend)->MatMul(x.data(), T, w, y.data()).ok()) return 0;
    if (r >= 3) t.push_back(Seconds() - t0);
  }
  return 2.0 * T * N * K / Median(t);
}

// A recorder of every MoE layer's routing, keeping the last `max_paths` token paths.
parallel::ExpertLoadOptions RecorderOptions(const model::MoeModel& m, int max_paths) {
  parallel::ExpertLoadOptions o;
  o.num_layers = static_cast<int>(m.MoeLayerIds().size());
  o.num_experts = static_cast<int>(m.config().num_experts);
  o.top_k = static_cast<int>(m.config().num_experts_per_tok);
  o.max_paths = max_paths;
  return o;
}

// What one decode step at `batch` sequences must at least cost on this machine.
struct StepLimit {
  double bytes = 0, flops = 0, memory_s = 0, compute_s = 0;
  double tokens_per_s(int64_t batch) const { return batch / std::max(memory_s, compute_s); }
};

// Distinct experts touched per MoE layer per step, summed over layers, mean over the steps of
// a recorded decode run: the recorder's last batch * steps token paths are the decode tokens.
double ExpertsTouchedPerStep(const parallel::ExpertLoadRecorder& recorder, int64_t batch,
                             int64_t steps) {
  const auto trace = recorder.Snapshot();
  const auto& paths = trace.token_paths;
  if (static_cast<int64_t>(paths.size()) < batch * steps) return 0;
  double sum = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t first = static_cast<int64_t>(paths.size()) - (steps - s) * batch;
    for (int l = 0; l < trace.num_layers; ++l) {
      std::set<int32_t> touched;
      for (int64_t t = first; t < first + batch; ++t)
        if (l < static_cast<int>(paths[t].size()))
          touched.insert(paths[t][l].begin(), paths[t][l].end());
      sum += static_cast<double>(touched.size());
    }
  }
  return sum / steps;
}

int Main(int argc, char** argv) {
  std::string model_dir, dtype = "bf16", backend = "auto", only;
  int64_t threads = 2, reps = 3, steps = 16;
  server::FlagSet flags("model_bench", "Engine benchmark on the bench preset.");
  flags.Add("model", &model_dir, "checkpoint folder (default: write the bench preset to the cache)");
  flags.Add("dtype", &dtype,
            "dtype of the weights: bf16 | f32 (the generated checkpoint's; with --model, name "
            "the checkpoint's, which the limit line counts)");
  flags.Add("backend", &backend, "kernel backend");
  flags.Add("threads", &threads, "threads");
  flags.Add("reps", &reps, "repetitions per figure (median reported)");
  flags.Add("decode-steps", &steps, "timed decode steps per repetition");
  std::string batches = "1,4,16,32";
  flags.Add("batches", &batches, "decode batch sizes, comma-separated (the first one is the baseline the others are checked against)");
  flags.Add("only", &only, "prefill | decode | load-stats (default: prefill and decode)");
  auto st = flags.Parse(argc, argv);
  if (!st.ok()) {
    std::cerr << st.message() << "\n";
    return absl::IsCancelled(st) ? 0 : 2;
  }
  ThreadPool::SetDefaultThreads(static_cast<int>(threads));
  if (model_dir.empty()) {
    const char* cache = std::getenv("SWITCHYARD_CACHE");
    const char* home = std::getenv("HOME");
    std::string base = cache && *cache ? cache : std::string(home ? home : "/tmp") + "/.cache/switchyard";
    model_dir = base + "/bench-mixtral-" + dtype;
    if (!std::ifstream(model_dir + "/.complete").good()) {
      std::fprintf(stderr, "writing the bench checkpoint to %s ...\n", model_dir.c_str());
      model::SyntheticOptions o;
      o.preset = "bench";
      o.out_dir = model_dir;
      auto d = ParseDType(dtype);
      if (!d.ok()) {
        std::cerr << d.status() << "\n";
        return 2;
      }
      o.dtype = *d;
      auto w = model::WriteSyntheticCheckpoint(o);
      if (!w.ok()) {
        std::cerr << w << "\n";
        return 1;
      }
      std::ofstream(model_dir + "/.complete") << "ok\n";
    }
  }
  model::LoadOptions lo;
  lo.backend = backend;
  auto loaded = model::MoeModel::Load(model_dir, lo);
  if (!loaded.ok()) {
    std::cerr << loaded.status() << "\n";
    return 1;
  }
  model::MoeModel& m = **loaded;
  const double bw = MeasureReadBandwidth();
  const double bytes_per_token = static_cast<double>(m.DecodeBytesPerToken());
  const double roofline = bw * 1e9 / bytes_per_token;
  // The limit line's parts: the bytes every step reads whatever it routes (batch 1's bytes
  // less its k experts per MoE layer), one routed expert's bytes, the FLOPs of one token's
  // weights, and our GEMM's compute-bound rate.
  const auto& c = m.config();
  const auto weight_dtype = ParseDType(dtype);
  const double wsize = weight_dtype.ok() ? DTypeSize(*weight_dtype) : 2;
  const double expert_bytes = 3.0 * c.hidden_size * c.moe_intermediate_size * wsize;
  const double moe_layers = static_cast<double>(m.MoeLayerIds().size());
  const double shared_bytes = bytes_per_token - moe_layers * c.num_experts_per_tok * expert_bytes;
  const double active_params = bytes_per_token / wsize;
  const double gemm_flops =
      MeasureGemmFlops(backend, weight_dtype.ok() ? *weight_dtype : DType::kBF16);
  auto llama = LlamaCppFigures(std::string(SY_SHARED_DIR) + "/reference/llamacpp-bench.md", dtype);

  std::printf("model: %s (%.3f B parameters, %s), backend %s, %lld threads\n", model_dir.c_str(),
              m.NumParameters() / 1e9, dtype.c_str(), backend.c_str(), static_cast<long long>(threads));
  std::printf("memory read bandwidth (same run, %lld threads): %.1f GB/s; batch-1 decode reads %.0f MB "
              "of weights per token -> roofline %.1f tokens/s\n",
              static_cast<long long>(threads), bw, bytes_per_token / 1e6, roofline);
  std::printf("GEMM rate (same run, %s weights, 256 x 1024 x 1024, in cache): %.1f GFLOP/s\n\n",
              dtype.c_str(), gemm_flops / 1e9);
  std::printf("| test | ours (tokens/s) | llama.cpp (tokens/s) | ours / llama.cpp | note |\n");
  std::printf("|---|---|---|---|---|\n");
  std::vector<Failure> fails;
  auto row = [&](const std::string& name, double ours, const std::string& key, const std::string& note) {
    double ref = llama.count(key) ? llama[key] : 0;
    std::printf("| %s | %.1f | %s | %s | %s |\n", name.c_str(), ours, ref > 0 ? std::to_string(static_cast<int>(ref)).c_str() : "-",
                ref > 0 ? (std::to_string(ours / ref).substr(0, 4) + "x").c_str() : "-", note.c_str());
    std::fflush(stdout);
  };
  if (only.empty() || only == "prefill") {
    for (int64_t len : {128, 512}) {
      std::vector<double> t;
      TimePrefill(m, len, &fails);  // warm-up
      for (int64_t r = 0; r < reps; ++r) t.push_back(TimePrefill(m, len, &fails));
      row("prefill " + std::to_string(len), len / Median(t), "pp" + std::to_string(len), "");
    }
  }
  if (only.empty() || only == "decode") {
    std::vector<float> base_logits;
    std::vector<int64_t> batch_list;
    for (absl::string_view b : absl::StrSplit(batches, ',')) {
      int64_t v = 0;
      if (!absl::SimpleAtoi(b, &v) || v < 1) {
        std::cerr << "--batches: bad batch size '" << b << "'\n";
        return 1;
      }
      batch_list.push_back(v);
    }
    for (int64_t b : batch_list) {
      std::vector<double> t;
      std::vector<float> seq0;
      for (int64_t r = 0; r < reps; ++r) t.push_back(TimeDecode(m, b, steps, &seq0, &fails));
      std::string note;
      if (b == 1) {
        char buf[64];
        std::snprintf(buf, sizeof(buf), "%.0f %% of roofline", 100.0 * steps / Median(t) / roofline);
        note = buf;
      } else {
        // One more (untimed) run with the routing recorded, for the experts each step touches.
        parallel::ExpertLoadRecorder recorder(RecorderOptions(m, static_cast<int>(b * (steps + 1))));
        m.SetLoadRecorder(&recorder);
        std::vector<float> unused;
        TimeDecode(m, b, steps, &unused, &fails);
        m.SetLoadRecorder(nullptr);
        const double touched = ExpertsTouchedPerStep(recorder, b, steps);
        StepLimit lim;
        const double ctx = 128 + 1 + steps / 2.0;  // mean positions attended in a timed step
        lim.bytes = shared_bytes + touched * expert_bytes +
                    b * ctx * c.num_layers * 2.0 * c.num_kv_heads * c.head_dim * sizeof(float);
        lim.flops = b * (2.0 * active_params +
                         c.num_layers * 4.0 * ctx * c.num_heads * c.head_dim);
        lim.memory_s = lim.bytes / (bw * 1e9);
        lim.compute_s = gemm_flops > 0 ? lim.flops / gemm_flops : 0;
        const double ours = b * steps / Median(t), limit = lim.tokens_per_s(b);
        char buf[160];
        std::snprintf(buf, sizeof(buf),
                      "%.0f %% of the limit %.0f (%.0f experts/step: %.0f MB, %.2f ms read; "
                      "%.2f GFLOP, %.2f ms compute)",
                      100.0 * ours / limit, limit, touched, lim.bytes / 1e6, lim.memory_s * 1e3,
                      lim.flops / 1e9, lim.compute_s * 1e3);
        note = buf;
      }
      if (b == batch_list.front()) {
        base_logits = seq0;
      } else {
        double mx = 0, lo = 1e30, hi = -1e30;
        for (size_t i = 0; i < seq0.size(); ++i) {
          mx = std::max(mx, std::fabs(static_cast<double>(seq0[i]) - base_logits[i]));
          lo = std::min<double>(lo, base_logits[i]);
          hi = std::max<double>(hi, base_logits[i]);
        }
        if (mx > 1e-2 * (hi - lo))
          fails.push_back({"batch " + std::to_string(b) + ": sequence 0 logits differ from batch 1 by " + std::to_string(mx)});
      }
      row("decode batch " + std::to_string(b), b * steps / Median(t), b == 1 ? "tg1" : "b" + std::to_string(b), note);
    }
    if (llama.count("b1")) std::printf("(llama.cpp batched-bench at 1 sequence: %.0f tokens/s)\n", llama["b1"]);
  }
  if (only == "load-stats") {
    // Cost of the expert-load statistics (under 2 % of step time): decode at batch 32
    // with and without the recorder, alternated, medians.
    const parallel::ExpertLoadOptions lo = RecorderOptions(m, parallel::ExpertLoadOptions().max_paths);
    parallel::ExpertLoadRecorder recorder(lo);
    std::vector<double> off, on;
    std::vector<float> seq0;
    for (int64_t r = 0; r < reps; ++r) {
      m.SetLoadRecorder(nullptr);
      off.push_back(TimeDecode(m, 32, steps, &seq0, &fails));
      m.SetLoadRecorder(&recorder);
      on.push_back(TimeDecode(m, 32, steps, &seq0, &fails));
    }
    m.SetLoadRecorder(nullptr);
    const double a = Median(off) / steps, b = Median(on) / steps;
    // The end-to-end difference is within this shared machine's noise, so also time the
    // recorder alone on the same shapes (32 tokens x every MoE layer per step).
    std::vector<int32_t> ids(32 * lo.top_k);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i % lo.num_experts);
    const int iters = 2000;
    const double t0 = Seconds();
    for (int it = 0; it < iters; ++it) {
      for (int l = 0; l < lo.num_layers; ++l) recorder.Record(l, ids.data(), 32);
      recorder.EndStep();
    }
    const double per_step = (Seconds() - t0) / iters;
    std::printf("| decode batch 32 step | %.2f ms without statistics | %.2f ms with (end to end, noisy) | "
                "recorder alone %.1f us per step = %.3f %% of the step |\n",
                a * 1e3, b * 1e3, per_step * 1e6, 100.0 * per_step / a);
    if (recorder.steps_recorded() == 0) fails.push_back({"recorder saw no steps"});
  }
  if (!fails.empty()) {
    for (const auto& f : fails) std::fprintf(stderr, "CHECK FAILED: %s\n", f.what.c_str());
    return 1;
  }
  std::printf("\nchecks passed: finite logits; batched decode matches batch 1 on sequence 0\n");
  return 0;
}

}  // namespace
}  // namespace sy::bench

int main(int argc, char** argv) { return sy::bench::Main(argc, argv); }
