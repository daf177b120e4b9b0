#include "server/generate_request.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

absl::Status ToEngineRequest(const v1::GenerateRequest& in, const GenerateRequestContext& ctx,
                             scheduler::Request* out) {
  switch (in.input_case()) {
    case v1::GenerateRequest::kText: {
      if (in.text().empty()) return absl::InvalidArgumentError("text: empty prompt");
      if (in.text().size() > ctx.max_prompt_bytes)
        return absl::InvalidArgumentError(absl::StrCat("text: ", in.text().size(),
                                                       " bytes cannot fit the context of ",
                                                       ctx.context_length, " tokens"));
      if (ctx.tokenizer == nullptr)
        return absl::InvalidArgumentError(
            "text: this model has no tokenizer.json; send token_ids instead");
      out->prompt = ctx.tokenizer->Encode(in.text(), ctx.tokenizer->bos_id().has_value());
      if (out->prompt.empty()) return absl::InvalidArgumentError("text: no tokens");
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      if (in.token_ids().ids_size() == 0)
        return absl::InvalidArgumentError("token_ids: empty prompt");
      out->prompt.assign(in.token_ids().ids().begin(), in.token_ids().ids().end());
      break;
    default:
      return absl::InvalidArgumentError("input: set either text or token_ids");
  }
  const v1::SamplingParams& s = in.sampling();
  scheduler::GenerationParams& p = out->params;
  p.sampling.temperature = s.temperature();
  p.sampling.top_p = s.has_top_p() ? s.top_p() : 1.f;
  p.sampling.top_k = s.top_k();
  p.sampling.seed = s.seed();
  const int64_t room = ctx.context_length - static_cast<int64_t>(out->prompt.size());
  p.max_new_tokens = s.has_max_new_tokens()
                         ? s.max_new_tokens()
                         : std::max<int64_t>(1, std::min(ctx.default_max_new_tokens, room));
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.stop_strings.assign(s.stop().begin(), s.stop().end());
  p.ignore_eos = s.ignore_eos();
  return absl::OkStatus();
}

size_t MaxPromptBytes(const model::Tokenizer& tokenizer, int64_t context_length) {
  size_t longest = 1;
  for (int64_t id = 0; id < tokenizer.vocab_size(); ++id) {
    const int32_t one = static_cast<int32_t>(id);
    longest = std::max(longest, tokenizer.DecodeBytes({&one, 1}, false, false).size());
  }
  return 4 * longest * static_cast<size_t>(context_length + 1);
}

}  // namespace sy::server
