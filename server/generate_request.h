// The conversion of a switchyard.v1.GenerateRequest into the engine's scheduler::Request: the
// prompt (text tokenized, or ids as given) and the sampling parameters. Errors are
// INVALID_ARGUMENT naming the proto field; scheduler::ValidateRequest checks the rest (ids
// in the vocabulary, the context, the sampling ranges) when the request is submitted.
// Thread safety: a plain function.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "model/tokenizer.h"
#include "scheduler/request.h"
#include "switchyard/v1/inference.pb.h"

namespace sy::server {

struct GenerateRequestContext {
  const model::Tokenizer* tokenizer = nullptr;  // null: text prompts are refused
  // A text longer than this cannot fit the context and is refused before tokenizing.
  size_t max_prompt_bytes = SIZE_MAX;
  int64_t context_length = 0;
  int64_t default_max_new_tokens = 256;  // when the request leaves max_new_tokens unset
};

// Fills out->prompt and out->params (not id, deadline or sink).
absl::Status ToEngineRequest(const ::switchyard::v1::GenerateRequest& in,
                             const GenerateRequestContext& ctx, scheduler::Request* out);

// The longest text (bytes) whose tokens could fit `context_length`: every token covers at
// least one byte of normalised text and at most the tokenizer's longest token; normalisation
// shrinks text by at most 4x.
size_t MaxPromptBytes(const model::Tokenizer& tokenizer, int64_t context_length);

}  // namespace sy::server
