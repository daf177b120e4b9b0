#include "tests/testing/model_fixtures.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/core/logging.h"
#include "model/sampler.h"

namespace sy::testing {
namespace {

struct TempDirs {
  std::mutex mu;
  std::vector<std::string> dirs;
  ~TempDirs() {
    std::error_code ec;
    for (const auto& d : dirs) std::filesystem::remove_all(d, ec);
  }
};
TempDirs& Dirs() {
  static TempDirs* t = new TempDirs();
  static bool registered = [] {
    std::atexit([] { Dirs().~TempDirs(); });
    return true;
  }();
  (void)registered;
  return *t;
}

}  // namespace

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string tmpl = absl::StrCat(base && *base ? base : "/tmp", "/sy-", prefix, "-XXXXXX");
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  SY_CHECK(mkdtemp(buf.data()) != nullptr) << "mkdtemp " << tmpl;
  std::string dir(buf.data());
  std::lock_guard<std::mutex> lock(Dirs().mu);
  Dirs().dirs.push_back(dir);
  return dir;
}

std::string SyntheticModelDir(model::Arch arch, const std::string& preset, DType dtype,
                              uint64_t seed, int64_t shard_bytes,
                              const std::vector<int64_t>& mlp_only_layers) {
  static std::mutex mu;
  static std::map<std::string, std::string>* cache = new std::map<std::string, std::string>();
  const std::string key = absl::StrCat(model::ArchName(arch), "/", preset, "/", DTypeName(dtype),
                                       "/", seed, "/", shard_bytes, "/dense:",
                                       absl::StrJoin(mlp_only_layers, ","));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  model::SyntheticOptions o;
  o.arch = arch;
  o.preset = preset;
  o.dtype = dtype;
  o.seed = seed;
  o.shard_bytes = shard_bytes;
  o.mlp_only_layers = mlp_only_layers;
  o.out_dir = MakeTempDir(absl::StrCat("model-", model::ArchName(arch)));
  SY_CHECK_OK(model::WriteSyntheticCheckpoint(o));
  (*cache)[key] = o.out_dir;
  return o.out_dir;
}

std::string ReferenceDir() { return std::string(SY_SHARED_DIR) + "/reference/mixtral-tiny"; }

std::vector<float> PrefillLogits(model::MoeModel& m, const std::vector<int32_t>& prompt) {
  const int64_t bs = 16, nb = (static_cast<int64_t>(prompt.size()) + bs - 1) / bs;
  model::KvCache cache(m.config(), nb, bs);
  std::vector<int32_t> blocks(nb);
  for (int64_t i = 0; i < nb; ++i) blocks[i] = static_cast<int32_t>(i);
  model::SequenceInput in;
  in.tokens = prompt;
  in.block_table = blocks;
  std::vector<float> logits;
  SY_CHECK_OK(m.Forward(std::span<const model::SequenceInput>(&in, 1), cache, &logits));
  return logits;
}

std::vector<int32_t> GreedyGenerate(model::MoeModel& m, const std::vector<int32_t>& prompt,
                                    int64_t max_new) {
  const int64_t bs = 16, total = static_cast<int64_t>(prompt.size()) + max_new;
  const int64_t nb = (total + bs - 1) / bs;
  model::KvCache cache(m.config(), nb, bs);
  std::vector<int32_t> blocks(nb);
  for (int64_t i = 0; i < nb; ++i) blocks[i] = static_cast<int32_t>(i);
  std::vector<int32_t> feed = prompt, out;
  std::vector<float> logits;
  int64_t pos = 0;
  for (int64_t s = 0; s < max_new; ++s) {
    model::SequenceInput in;
    in.tokens = feed;
    in.start_pos = pos;
    in.block_table = blocks;
    SY_CHECK_OK(m.Forward(std::span<const model::SequenceInput>(&in, 1), cache, &logits));
    pos += static_cast<int64_t>(feed.size());
    int32_t next = model::Greedy(logits.data(), m.config().vocab_size);
    out.push_back(next);
    feed.assign(1, next);
  }
  return out;
}

}  // namespace sy::testing
