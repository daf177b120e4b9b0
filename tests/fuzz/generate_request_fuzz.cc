// libFuzzer target: what a Generate call's bytes become before the engine sees them — the
// protobuf parse (switchyard.v1.GenerateRequest, as InferenceService parses its raw bytes),
// the conversion (server/generate_request.h, text through a synthetic byte-level tokenizer)
// and scheduler::ValidateRequest. Any bytes give an error or a request the engine can serve:
// a non-empty prompt of ids in the vocabulary that, with max_new_tokens >= 1, fits the context.
//   ./build-fuzz/tests/fuzz/generate_request_fuzz -max_total_time=600
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "model/tokenizer.h"
#include "scheduler/request.h"
#include "server/generate_request.h"
#include "switchyard/v1/inference.pb.h"

namespace {

constexpr int64_t kVocab = 700;
constexpr int64_t kContext = 512;

const sy::model::Tokenizer& Tok() {
  static const std::unique_ptr<sy::model::Tokenizer> tok = [] {
    const std::string dir = std::filesystem::temp_directory_path().string() +
                            "/sy_generate_request_fuzz_" + std::to_string(::getpid());
    if (!sy::model::WriteSyntheticTokenizer(dir, kVocab, sy::model::TokenizerStyle::kByteLevelBpe).ok())
      std::abort();
    auto t = sy::model::Tokenizer::FromFile(dir + "/tokenizer.json");
    std::filesystem::remove_all(dir);
    if (!t.ok()) std::abort();
    return std::move(*t);
  }();
  return *tok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const size_t max_bytes = sy::server::MaxPromptBytes(Tok(), kContext);
  switchyard::v1::GenerateRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  sy::server::GenerateRequestContext ctx;
  ctx.tokenizer = &Tok();
  ctx.max_prompt_bytes = max_bytes;
  ctx.context_length = kContext;
  sy::scheduler::Request r;
  if (!sy::server::ToEngineRequest(req, ctx, &r).ok()) return 0;
  if (!sy::scheduler::ValidateRequest(r, {kVocab, kContext}).ok()) return 0;
  const int64_t n = static_cast<int64_t>(r.prompt.size());
  if (n == 0 || r.params.max_new_tokens < 1 || n + r.params.max_new_tokens > kContext) std::abort();
  for (int32_t id : r.prompt)
    if (id < 0 || id >= kVocab) std::abort();
  if (!std::isfinite(r.params.sampling.temperature) || r.params.sampling.temperature < 0 ||
      !(r.params.sampling.top_p > 0 && r.params.sampling.top_p <= 1) || r.params.sampling.top_k < 0)
    std::abort();
  return 0;
}
