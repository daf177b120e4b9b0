// `switchyard run`: offline generation from a checkpoint, no server. Prints the generated
// text (or, with --ids-only, the generated token ids on one line).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/core/thread_pool.h"
#include "model/moe_model.h"
#include "model/sampler.h"
#include "model/synthetic.h"
#include "model/tokenizer.h"
#include "server/commands.h"
#include "server/flags.h"

namespace sy::server {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "run: %s\n", std::string(s.message()).c_str());
  return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

int RunCommand(int argc, char** argv) {
  std::string model_dir = "demo", prompt_ids, prompt, backend = "auto";
  int64_t max_new = 16, top_k = 0, seed = 0, threads = 0;
  double temperature = 0, top_p = 1;
  bool ids_only = false, ignore_eos = false, no_bos = false;
  FlagSet flags("run", "Generates from a checkpoint offline (no server) and prints the result.");
  flags.Add("model", &model_dir, "checkpoint folder, or 'demo' for the built-in demo model");
  flags.Add("prompt-ids", &prompt_ids, "prompt as comma-separated token ids (e.g. 1,5,9)");
  flags.Add("prompt", &prompt, "prompt text (needs the folder's tokenizer.json); also the first positional argument");
  flags.Add("max-new-tokens", &max_new, "tokens to generate");
  flags.Add("temperature", &temperature, "0 = greedy");
  flags.Add("top-p", &top_p, "nucleus sampling mass, in (0, 1]");
  flags.Add("top-k", &top_k, "keep the k best tokens (0 = all)");
  flags.Add("seed", &seed, "sampling seed (same seed, same tokens)");
  flags.Add("ids-only", &ids_only, "print only the generated token ids, space-separated, on one line");
  flags.Add("ignore-eos", &ignore_eos, "keep generating past the end-of-sequence token");
  flags.Add("no-bos", &no_bos, "do not prepend BOS to a text prompt");
  std::string device = "cpu";
  flags.Add("device", &device, "where the model runs: cpu, or cuda / cuda:K (the weight products on GPU K)");
  flags.Add("backend", &backend, "CPU kernel backend: auto | cpu | reference");
  flags.Add("threads", &threads, "CPU threads (0 = all cores)");
  absl::Status s = flags.Parse(argc, argv);
  if (absl::IsCancelled(s)) {
    std::cout << s.message();
    return 0;
  }
  if (!s.ok()) return Fail(s);
  if (auto b = BackendForDevice(device, backend); b.ok()) {
    backend = *b;
  } else {
    return Fail(b.status());
  }
  if (prompt.empty() && !flags.positional().empty()) prompt = flags.positional()[0];
  if (threads > 0) ThreadPool::SetDefaultThreads(static_cast<int>(threads));
  if (max_new <= 0) return Fail(absl::InvalidArgumentError("--max-new-tokens must be positive"));
  if (temperature < 0 || std::isnan(temperature))
    return Fail(absl::InvalidArgumentError("--temperature must be >= 0"));
  if (!(top_p > 0 && top_p <= 1)) return Fail(absl::InvalidArgumentError("--top-p must be in (0, 1]"));
  if (top_k < 0) return Fail(absl::InvalidArgumentError("--top-k must be >= 0"));

  if (model_dir == "demo") {
    model_dir = model::DefaultDemoDir();
    s = model::EnsureDemoModel(model_dir);
    if (!s.ok()) return Fail(s);
  }
  model::LoadOptions lo;
  lo.backend = backend;
  auto loaded = model::MoeModel::Load(model_dir, lo);
  if (!loaded.ok()) return Fail(loaded.status());
  model::MoeModel& m = **loaded;
  const model::ModelConfig& c = m.config();

  std::unique_ptr<model::Tokenizer> tok;
  if (auto t = model::Tokenizer::FromFile(model_dir + "/tokenizer.json"); t.ok()) tok = std::move(*t);

  std::vector<int32_t> ids;
  if (!prompt_ids.empty()) {
    for (absl::string_view part : absl::StrSplit(prompt_ids, ',', absl::SkipWhitespace())) {
      int32_t v;
      if (!absl::SimpleAtoi(part, &v))
        return Fail(absl::InvalidArgumentError("--prompt-ids: '" + std::string(part) + "' is not a token id"));
      ids.push_back(v);
    }
  } else if (!prompt.empty()) {
    if (!tok) return Fail(absl::FailedPreconditionError(model_dir + " has no usable tokenizer.json for a text prompt; use --prompt-ids"));
    ids = tok->Encode(prompt, !no_bos);
  }
  if (ids.empty()) return Fail(absl::InvalidArgumentError("give a prompt: --prompt-ids 1,5,9 or --prompt TEXT"));
  for (int32_t id : ids)
    if (id < 0 || id >= c.vocab_size)
      return Fail(absl::InvalidArgumentError("--prompt-ids: token id " + std::to_string(id) +
                                             " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")"));
  const int64_t total = static_cast<int64_t>(ids.size()) + max_new;
  if (total > c.max_position_embeddings)
    return Fail(absl::InvalidArgumentError("prompt + --max-new-tokens (" + std::to_string(total) +
                                           ") exceeds the context of " + std::to_string(c.max_position_embeddings)));

  const int64_t block_size = 16;
  const int64_t num_blocks = (total + block_size - 1) / block_size;
  model::KvCache cache(c, num_blocks, block_size);
  std::vector<int32_t> blocks(num_blocks);
  for (int64_t b = 0; b < num_blocks; ++b) blocks[b] = static_cast<int32_t>(b);

  model::SamplingParams sp;
  sp.temperature = static_cast<float>(temperature);
  sp.top_p = static_cast<float>(top_p);
  sp.top_k = static_cast<int32_t>(top_k);
  sp.seed = static_cast<uint64_t>(seed);
  model::Sampler sampler(sp);

  std::vector<int32_t> out;
  std::vector<float> logits;
  std::vector<int32_t> feed = ids;
  int64_t pos = 0;
  model::Tokenizer::StreamDecoder stream(tok.get());
  const bool print_text = !ids_only && tok != nullptr;
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < max_new; ++step) {
    model::SequenceInput in;
    in.tokens = feed;
    in.start_pos = pos;
    in.block_table = blocks;
    s = m.Forward(std::span<const model::SequenceInput>(&in, 1), cache, &logits);
    if (!s.ok()) return Fail(s);
    pos += static_cast<int64_t>(feed.size());
    int32_t next = sampler.Sample(logits.data(), c.vocab_size);
    out.push_back(next);
    if (print_text) {
      std::cout << stream.Add(next) << std::flush;
    }
    bool eos = std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), next) != c.eos_token_ids.end();
    if (eos && !ignore_eos) break;
    feed.assign(1, next);
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (ids_only || !tok) {
    for (size_t i = 0; i < out.size(); ++i) std::cout << (i ? " " : "") << out[i];
    std::cout << "\n";
  } else {
    std::cout << stream.Flush() << "\n";
  }
  if (!ids_only)
    std::fprintf(stderr, "%zu prompt tokens, %zu generated in %.2f s (%.1f tokens/s)\n", ids.size(),
                 out.size(), secs, out.size() / secs);
  return 0;
}

}  // namespace sy::server
