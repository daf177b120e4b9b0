// Tokenizer: text <-> token ids from a Hugging Face `tokenizer.json`.
//
// Two model families: byte-level BPE (GPT-2 style, as Qwen and OLMoE use: ByteLevel
// pre-tokenizer + decoder, merges) and SentencePiece-style BPE with byte fallback (as Mixtral
// and Llama use: "▁" for spaces, <0xXX> byte tokens). Added/special tokens (BOS, EOS, ...)
// are matched verbatim before BPE. StreamDecoder turns ids into text incrementally and never
// emits a partial UTF-8 character.
//
// Thread safety: a Tokenizer is immutable after loading and safe to share; a StreamDecoder
// belongs to one sequence.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sy::model {

class Tokenizer {
 public:
  // InvalidArgument naming the file for malformed JSON or an unsupported model type.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(const std::string& json_text);
  virtual ~Tokenizer() = default;

  virtual std::vector<int32_t> Encode(const std::string& text, bool add_bos) const = 0;
  // Text of `ids`; invalid UTF-8 (e.g. a lone byte token) comes out as U+FFFD.
  virtual std::string Decode(std::span<const int32_t> ids, bool skip_special = true) const = 0;
  // The raw bytes behind Decode, which may end inside (or contain) invalid UTF-8.
  // `at_start`: the ids begin the text, so a decoder that strips the leading space
  // SentencePiece adds does so; StreamDecoder passes false for a window past the start.
  virtual std::string DecodeBytes(std::span<const int32_t> ids, bool skip_special,
                                  bool at_start) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;

  // Incremental detokenization for streaming. The concatenation of everything Add and Flush
  // return equals Decode(all ids) (skip_special = true). Each Add decodes only a window of
  // recent ids (vLLM / TGI "prefix offset / read offset"): O(new tokens) amortised.
  class StreamDecoder {
   public:
    explicit StreamDecoder(const Tokenizer* tok) : tok_(tok) {}
    // `continues_text`: the ids continue text already shown (the prompt), so the leading
    // space that a SentencePiece decoder strips at the start of a text is kept: "▁Paris"
    // streams as " Paris" (as vLLM / OpenAI-style APIs show it), not "Paris".
    StreamDecoder(const Tokenizer* tok, bool continues_text)
        : tok_(tok), continues_text_(continues_text) {}
    // Text newly complete after appending `id` ("" when it ends inside a UTF-8 char).
    std::string Add(int32_t id);
    // Whatever remains (invalid trailing bytes become U+FFFD).
    std::string Flush();

   private:
    const Tokenizer* tok_;
    bool continues_text_ = false;
    std::vector<int32_t> ids_;
    size_t emitted_bytes_ = 0;   // bytes of DecodeBytes(ids_[0:read_offset_]) sent so far
    size_t prefix_offset_ = 0;   // window start: ids_[prefix_offset_:read_offset_] is context
    size_t read_offset_ = 0;     // ids_[read_offset_:] are not yet emitted
    size_t bytes_before_prefix_ = 0;  // bytes of DecodeBytes(ids_[0:prefix_offset_])
  };
};

enum class TokenizerStyle { kByteLevelBpe, kSentencePieceBpe };

// Writes tokenizer.json (and tokenizer_config.json) of exactly `vocab_size` tokens into
// `dir`: special tokens <unk>=0, <s>=1, </s>=2, the 256 byte tokens, then merges learnt from
// a built-in English text until the vocabulary is full. Used by `switchyard make-model`.
absl::Status WriteSyntheticTokenizer(const std::string& dir, int64_t vocab_size,
                                     TokenizerStyle style);

}  // namespace sy::model
