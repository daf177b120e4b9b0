// Sequence: one request's state inside the engine — its tokens (prompt, then output), how many
// of them are in the KV cache, its block table and its streaming detokenizer. Its next token is
// draw num_output_tokens() of its sampling parameters (model/sampler.h), wherever it runs.
//
// Owned by BatchScheduler (created from a Request when the engine drains its intake queue);
// touched only by the engine thread.
//
// Invariants: 0 <= num_computed <= tokens.size(); the block table covers num_computed
// positions (and, while scheduled, the positions of the step's chunk); a waiting sequence
// holds no blocks and has no home. Preemption by recompute sets num_computed to 0 and frees the table; the
// tokens (prompt and output so far) are prefilled again when it is readmitted.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/sampler.h"
#include "model/tokenizer.h"
#include "scheduler/request.h"

namespace sy::scheduler {

enum class SequenceStatus { kWaiting, kRunning, kFinished };

struct Sequence {
  Sequence(int64_t seq_id, Request req, const model::Tokenizer* tokenizer)
      : id(seq_id),
        request(std::move(req)),
        tokens(request.prompt),
        num_prompt_tokens(static_cast<int64_t>(request.prompt.size())) {
    if (tokenizer != nullptr) decoder.emplace(tokenizer);
  }

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  // Tokens not yet in the KV cache: the prompt (or its rest) during prefill, 1 in decode.
  int64_t num_pending() const { return num_tokens() - num_computed; }

  int64_t id;  // engine-wide, increasing in arrival order
  Request request;
  std::vector<int32_t> tokens;
  int64_t num_prompt_tokens;
  int64_t num_computed = 0;
  std::vector<int32_t> block_table;  // block ids of the home's KV pool
  int32_t home = -1;                 // KV pool (home rank id) while running; -1 while waiting
  SequenceStatus status = SequenceStatus::kWaiting;
  int64_t num_preemptions = 0;

  std::optional<model::Tokenizer::StreamDecoder> decoder;
  std::string text;           // detokenized output so far
  size_t text_sent = 0;       // bytes of `text` already given to the sink
  FinishReason finish_reason = FinishReason::kNone;
  absl::Status finish_status;

  Clock::time_point first_scheduled{};  // zero until first admitted
  Clock::time_point first_token{};
  Clock::time_point last_token{};
};

}  // namespace sy::scheduler
