// BpeTokenizer: the one Tokenizer implementation, shared by tokenizer_json.cc (loading a
// Hugging Face tokenizer.json: the JSON sections set its tables and flags) and tokenizer.cc
// (encoding, decoding, streaming).
//
// One class covers both families: the byte-level one (GPT-2 / Qwen2 / OLMoE: text bytes are
// mapped to printable code points, split by a hand-coded regex, then merged) and the
// SentencePiece one (Mixtral / Llama: spaces become "▁", characters are merged, a character
// missing from the vocabulary falls back to <0xXX> byte tokens). Internal to model/.
// Thread safety: const after Build.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "model/tokenizer.h"
#include "model/tokenizer_internal.h"
#include "nlohmann/json.hpp"

namespace sy::model::tokenizer_internal {

namespace ti = tokenizer_internal;
using json = nlohmann::json;

inline constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // "▁" U+2581

// Replaces every `from` in *s by `to`.
void ReplaceAll(std::string* s, const std::string& from, const std::string& to);

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
};

enum class PrependScheme { kAlways, kFirst, kNever };

class BpeTokenizer final : public Tokenizer {
 public:
  // `config` is tokenizer_config.json or null; `name` prefixes every error.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Build(const json& j, const json& config,
                                                             const std::string& name);

  std::vector<int32_t> Encode(const std::string& text, bool add_bos) const override;
  std::string Decode(std::span<const int32_t> ids, bool skip_special) const override {
    return ti::ToValidUtf8(DecodeBytes(ids, skip_special, /*at_start=*/true));
  }
  std::string DecodeBytes(std::span<const int32_t> ids, bool skip_special,
                          bool at_start) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  std::optional<int32_t> bos_id() const override { return bos_; }
  std::optional<int32_t> eos_id() const override { return eos_; }

 private:
  struct NormOp {
    enum Kind { kPrepend, kReplace, kLowercase } kind;
    std::string a, b;
  };

  absl::Status ParseModel(const json& model);
  absl::Status ParseAddedTokens(const json& added);
  absl::Status ParseNormalizer(const json& n, int depth = 0);
  absl::Status ParsePreTokenizer(const json& p, int depth = 0);
  absl::Status ParseDecoder(const json& d, int depth = 0);
  void ResolveSpecialIds(const json& j, const json& config);
  std::optional<int32_t> IdOf(const std::string& token) const;
  void BuildPieces();

  void EncodeSegment(std::string_view seg, bool at_text_start, std::vector<int32_t>* out) const;
  void EncodeByteLevelWord(std::string_view word, std::vector<int32_t>* out) const;
  void EncodeCharWord(std::string_view word, std::vector<int32_t>* out) const;
  // Applies the ranked merges to `syms` (ids) and appends the result to `out`.
  void Merge(std::vector<int32_t>* syms, std::vector<int32_t>* out) const;

  std::string name_;
  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<std::string> piece_;  // decoded bytes of each id
  std::vector<uint8_t> special_;
  // (left id << 32 | right id) -> (rank, merged id).
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  std::vector<AddedToken> added_;
  std::array<std::vector<int32_t>, 256> added_by_first_byte_;  // indexes into added_, longest first

  std::optional<int32_t> unk_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_fallback_id_{};  // <0xXX> ids, -1 if absent

  std::vector<NormOp> norm_;
  // Byte-level pre-tokenizer.
  bool byte_level_ = false;
  bool byte_level_prefix_space_ = false;
  std::optional<ti::SplitOptions> split_;
  std::array<int32_t, 256> byte_id_{};  // id of the byte-level character of each byte, or -1
  // Metaspace pre-tokenizer.
  bool metaspace_ = false;
  std::string ms_replacement_;
  PrependScheme ms_prepend_ = PrependScheme::kAlways;
  bool ms_split_ = true;
  // Decoder.
  bool decode_byte_level_ = false;
  bool decode_byte_fallback_ = false;
  std::vector<std::pair<std::string, std::string>> decode_replace_;
  int strip_leading_ = 0;

  std::optional<int32_t> bos_, eos_;
};

}  // namespace sy::model::tokenizer_internal
