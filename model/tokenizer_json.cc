// Loading a Hugging Face tokenizer.json (and tokenizer_config.json beside it) into a
// BpeTokenizer: the model (vocabulary, merges), added tokens, normalizer, pre-tokenizer and
// decoder sections, and the special ids. Every size is bounded and every JSON type checked, so
// a hostile file is an error (tests/fuzz/tokenizer_fuzz.cc).
#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "model/tokenizer.h"
#include "model/tokenizer_bpe.h"
#include "model/tokenizer_internal.h"
#include "nlohmann/json.hpp"

namespace sy::model {
namespace tokenizer_internal {
namespace {

// Ids past this are rejected: a corrupt file must not make us allocate gigabytes.
constexpr int64_t kMaxTokenId = 1 << 24;
// Deepest Sequence-in-Sequence accepted (the parsers recurse).
constexpr int kMaxNesting = 32;

// "<0x41>" -> 0x41; -1 for anything else.
int ParseByteToken(std::string_view s) {
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return -1;
  int v = 0;
  for (char c : s.substr(3, 2)) {
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= c - '0';
    else if (c >= 'A' && c <= 'F')
      v |= c - 'A' + 10;
    else if (c >= 'a' && c <= 'f')
      v |= c - 'a' + 10;
    else
      return -1;
  }
  return v;
}

// The string of a "pattern" object ({"String": " "}); InvalidArgument for a regex.
absl::StatusOr<std::string> StringPattern(const json& pattern, const std::string& where) {
  if (pattern.is_object() && pattern.contains("String")) {
    return pattern["String"].get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": only {\"String\": ...} patterns are supported, got ", pattern.dump()));
}

PrependScheme ParsePrependScheme(const json& j) {
  if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
    const std::string s = j["prepend_scheme"].get<std::string>();
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    return PrependScheme::kAlways;
  }
  return j.value("add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

}  // namespace

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Build(const json& j, const json& config,
                                                                  const std::string& name) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": top level is not a JSON object"));
  }
  auto tok = std::unique_ptr<BpeTokenizer>(new BpeTokenizer());
  tok->name_ = name;
  if (!j.contains("model") || !j["model"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": no \"model\" object"));
  }
  SY_RETURN_IF_ERROR(tok->ParseModel(j["model"]));
  if (j.contains("added_tokens")) SY_RETURN_IF_ERROR(tok->ParseAddedTokens(j["added_tokens"]));
  if (j.contains("normalizer")) SY_RETURN_IF_ERROR(tok->ParseNormalizer(j["normalizer"]));
  if (j.contains("pre_tokenizer")) SY_RETURN_IF_ERROR(tok->ParsePreTokenizer(j["pre_tokenizer"]));
  if (j.contains("decoder")) SY_RETURN_IF_ERROR(tok->ParseDecoder(j["decoder"]));
  if (tok->byte_level_) {
    const auto& map = ti::ByteToUnicode();
    for (int b = 0; b < 256; ++b) tok->byte_id_[b] = tok->IdOf(map[b]).value_or(-1);
  }
  tok->BuildPieces();
  tok->ResolveSpecialIds(j, config);
  return tok;
}

absl::Status BpeTokenizer::ParseModel(const json& model) {
  std::string type = model.value("type", "");
  if (type.empty() && model.contains("merges")) type = "BPE";
  if (type != "BPE") {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": unsupported tokenizer model type \"",
                                                   type, "\" (only BPE is supported)"));
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": model.vocab is not an object"));
  }
  int64_t max_id = -1;
  for (const auto& [tok, id_json] : model["vocab"].items()) {
    const int64_t id = id_json.get<int64_t>();
    if (id < 0 || id >= kMaxTokenId) {
      return absl::InvalidArgumentError(
          absl::StrCat(name_, ": token id ", id, " of \"", tok, "\" out of range"));
    }
    vocab_[tok] = static_cast<int32_t>(id);
    max_id = std::max(max_id, id);
  }
  id_to_token_.assign(max_id + 1, "");
  for (const auto& [tok, id] : vocab_) id_to_token_[id] = tok;

  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    unk_ = IdOf(model["unk_token"].get<std::string>());
  }
  fuse_unk_ = model.value("fuse_unk", false);
  byte_fallback_ = model.value("byte_fallback", false);
  ignore_merges_ = model.value("ignore_merges", false);
  const std::string prefix =
      model.contains("continuing_subword_prefix") && model["continuing_subword_prefix"].is_string()
          ? model["continuing_subword_prefix"].get<std::string>()
          : "";
  const std::string suffix =
      model.contains("end_of_word_suffix") && model["end_of_word_suffix"].is_string()
          ? model["end_of_word_suffix"].get<std::string>()
          : "";
  if (!prefix.empty() || !suffix.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": BPE continuing_subword_prefix / end_of_word_suffix are not supported"));
  }
  byte_fallback_id_.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
    byte_fallback_id_[b] = IdOf(buf).value_or(-1);
  }

  if (!model.contains("merges") || model["merges"].is_null()) return absl::OkStatus();
  const json& merges = model["merges"];
  if (!merges.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": model.merges is not an array"));
  }
  merges_.reserve(merges.size());
  int32_t rank = 0;
  for (const json& m : merges) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat(name_, ": merge ", rank, " \"", s, "\" is not two tokens"));
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(name_, ": merge ", rank, " is neither \"a b\" nor [a, b]"));
    }
    auto ia = IdOf(a), ib = IdOf(b), iab = IdOf(a + b);
    if (!ia || !ib || !iab) {
      return absl::InvalidArgumentError(absl::StrCat(name_, ": merge ", rank, " (\"", a, "\", \"",
                                                     b, "\") uses a token not in the vocab"));
    }
    const uint64_t key = (static_cast<uint64_t>(*ia) << 32) | static_cast<uint32_t>(*ib);
    merges_.try_emplace(key, rank, *iab);  // the first (best-ranked) occurrence wins
    ++rank;
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParseAddedTokens(const json& added) {
  if (added.is_null()) return absl::OkStatus();
  if (!added.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": added_tokens is not an array"));
  }
  for (const json& a : added) {
    AddedToken t;
    const int64_t id = a.at("id").get<int64_t>();
    if (id < 0 || id >= kMaxTokenId) {
      return absl::InvalidArgumentError(
          absl::StrCat(name_, ": added token id ", id, " out of range"));
    }
    t.id = static_cast<int32_t>(id);
    t.content = a.at("content").get<std::string>();
    t.special = a.value("special", false);
    t.lstrip = a.value("lstrip", false);
    t.rstrip = a.value("rstrip", false);
    if (t.content.empty()) continue;
    if (static_cast<size_t>(t.id) >= id_to_token_.size()) id_to_token_.resize(t.id + 1);
    id_to_token_[t.id] = t.content;
    vocab_.try_emplace(t.content, t.id);
    added_.push_back(std::move(t));
  }
  std::vector<int32_t> order(added_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
    return added_[x].content.size() > added_[y].content.size();
  });
  for (int32_t i : order) {
    added_by_first_byte_[static_cast<uint8_t>(added_[i].content[0])].push_back(i);
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParseNormalizer(const json& n, int depth) {
  if (n.is_null()) return absl::OkStatus();
  if (depth > kMaxNesting) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": Sequence nested too deeply"));
  }
  const std::string type = n.value("type", "");
  if (type == "Sequence") {
    for (const json& sub : n.at("normalizers")) SY_RETURN_IF_ERROR(ParseNormalizer(sub, depth + 1));
  } else if (type == "Prepend") {
    norm_.push_back({NormOp::kPrepend, n.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace") {
    SY_ASSIGN_OR_RETURN(
        std::string from,
        StringPattern(n.at("pattern"), absl::StrCat(name_, ": normalizer Replace")));
    norm_.push_back({NormOp::kReplace, from, n.at("content").get<std::string>()});
  } else if (type == "Lowercase") {
    norm_.push_back({NormOp::kLowercase, "", ""});
  } else if (type == "NFC" || type == "NFKC" || type == "NFD" || type == "NFKD") {
    // Not applied: text is taken as already normalised (documented in model/README.md).
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": unsupported normalizer type \"", type, "\""));
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParsePreTokenizer(const json& p, int depth) {
  if (p.is_null()) return absl::OkStatus();
  if (depth > kMaxNesting) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": Sequence nested too deeply"));
  }
  const std::string type = p.value("type", "");
  if (type == "Sequence") {
    for (const json& sub : p.at("pretokenizers"))
      SY_RETURN_IF_ERROR(ParsePreTokenizer(sub, depth + 1));
  } else if (type == "ByteLevel") {
    byte_level_ = true;
    byte_level_prefix_space_ = p.value("add_prefix_space", false);
    if (p.value("use_regex", true) && !split_) split_ = ti::SplitOptions{};  // GPT-2 regex
  } else if (type == "Split") {
    const json& pat = p.at("pattern");
    std::string regex;
    if (pat.contains("Regex"))
      regex = pat["Regex"].get<std::string>();
    else if (pat.contains("String"))
      regex = pat["String"].get<std::string>();
    ti::SplitOptions opts;
    if (regex.find("[^\\r\\n\\p{L}\\p{N}]?") != std::string::npos) {
      opts.style = ti::SplitStyle::kCl100k;
    } else if (regex.find(" ?\\p{L}+") == std::string::npos) {
      SY_LOG(WARNING) << name_ << ": unrecognised Split pattern, using the GPT-2 split: " << regex;
    }
    if (regex.find("\\p{N}{1,3}") != std::string::npos)
      opts.max_digits = 3;
    else if (regex.find("\\p{N}+") != std::string::npos)
      opts.max_digits = 0;
    else if (regex.find("\\p{N}") != std::string::npos)
      opts.max_digits = 1;
    split_ = opts;
  } else if (type == "Metaspace") {
    metaspace_ = true;
    ms_replacement_ = p.value("replacement", std::string(kMetaspace));
    ms_prepend_ = ParsePrependScheme(p);
    ms_split_ = p.value("split", true);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": unsupported pre_tokenizer type \"", type, "\""));
  }
  return absl::OkStatus();
}

absl::Status BpeTokenizer::ParseDecoder(const json& d, int depth) {
  if (d.is_null()) return absl::OkStatus();
  if (depth > kMaxNesting) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": Sequence nested too deeply"));
  }
  const std::string type = d.value("type", "");
  if (type == "Sequence") {
    for (const json& sub : d.at("decoders")) SY_RETURN_IF_ERROR(ParseDecoder(sub, depth + 1));
  } else if (type == "ByteLevel") {
    decode_byte_level_ = true;
  } else if (type == "ByteFallback") {
    decode_byte_fallback_ = true;
  } else if (type == "Fuse") {
    // Pieces are always concatenated.
  } else if (type == "Replace") {
    SY_ASSIGN_OR_RETURN(std::string from,
                        StringPattern(d.at("pattern"), absl::StrCat(name_, ": decoder Replace")));
    decode_replace_.emplace_back(from, d.at("content").get<std::string>());
  } else if (type == "Strip") {
    if (d.value("content", std::string(" ")) != " " || d.value("stop", 0) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name_, ": only decoder Strip of leading spaces is supported"));
    }
    strip_leading_ = d.value("start", 0);
  } else if (type == "Metaspace") {
    decode_replace_.emplace_back(d.value("replacement", std::string(kMetaspace)), " ");
    if (ParsePrependScheme(d) != PrependScheme::kNever) strip_leading_ = 1;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": unsupported decoder type \"", type, "\""));
  }
  return absl::OkStatus();
}

std::optional<int32_t> BpeTokenizer::IdOf(const std::string& token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

void BpeTokenizer::BuildPieces() {
  special_.assign(id_to_token_.size(), 0);
  piece_.assign(id_to_token_.size(), "");
  std::vector<uint8_t> is_added(id_to_token_.size(), 0);
  for (const AddedToken& t : added_) {
    special_[t.id] = t.special;
    is_added[t.id] = 1;
    piece_[t.id] = t.content;
  }
  for (size_t id = 0; id < id_to_token_.size(); ++id) {
    if (is_added[id]) continue;
    const std::string& tok = id_to_token_[id];
    std::string& out = piece_[id];
    if (decode_byte_level_) {
      for (size_t pos = 0; pos < tok.size();) {
        auto [cp, len] = ti::DecodeUtf8(tok, pos);
        const int b = ti::UnicodeToByte(cp);
        if (b >= 0)
          out.push_back(static_cast<char>(b));
        else
          out.append(tok, pos, len);
        pos += len;
      }
      continue;
    }
    const int b = decode_byte_fallback_ ? ParseByteToken(tok) : -1;
    if (b >= 0) {
      out.push_back(static_cast<char>(b));
      continue;
    }
    out = tok;
    for (const auto& [from, to] : decode_replace_) ReplaceAll(&out, from, to);
  }
}

void BpeTokenizer::ResolveSpecialIds(const json& j, const json& config) {
  auto name_of = [](const json& v) -> std::optional<std::string> {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object() && v.contains("content") && v["content"].is_string()) {
      return v["content"].get<std::string>();
    }
    return std::nullopt;
  };
  bool bos_set = false, eos_set = false;
  if (config.is_object()) {
    if (config.contains("bos_token")) {
      bos_set = true;  // null means: this model has no BOS
      if (auto n = name_of(config["bos_token"])) bos_ = IdOf(*n);
    }
    if (config.contains("eos_token")) {
      eos_set = true;
      if (auto n = name_of(config["eos_token"])) eos_ = IdOf(*n);
    }
  }
  // A TemplateProcessing post-processor names the tokens it puts around a sequence.
  if (j.contains("post_processor") && j["post_processor"].is_object()) {
    const json& pp = j["post_processor"];
    if (pp.value("type", "") == "TemplateProcessing" && pp.contains("single") &&
        pp["single"].is_array() && !pp["single"].empty()) {
      const json& single = pp["single"];
      auto special_name = [&](const json& e) -> std::optional<std::string> {
        if (e.is_object() && e.contains("SpecialToken") && e["SpecialToken"].is_object()) {
          return name_of(e["SpecialToken"].value("id", json()));
        }
        return std::nullopt;
      };
      if (!bos_set) {
        if (auto n = special_name(single.front())) {
          bos_ = IdOf(*n);
          bos_set = bos_.has_value();
        }
      }
      if (!eos_set && single.size() > 1) {
        if (auto n = special_name(single.back())) {
          eos_ = IdOf(*n);
          eos_set = eos_.has_value();
        }
      }
    }
  }
  if (!bos_set) {
    for (const char* n : {"<s>", "<|begin_of_text|>", "<|startoftext|>"}) {
      if ((bos_ = IdOf(n))) break;
    }
  }
  if (!eos_set) {
    for (const char* n : {"</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"}) {
      if ((eos_ = IdOf(n))) break;
    }
  }
}

}  // namespace tokenizer_internal

namespace {

using tokenizer_internal::BpeTokenizer;
using tokenizer_internal::json;

absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& text,
                                                const std::string& config_text,
                                                const std::string& name,
                                                const std::string& config_name) {
  json j, config;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": malformed JSON: ", e.what()));
  }
  if (!config_text.empty()) {
    try {
      config = json::parse(config_text);
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(config_name, ": malformed JSON: ", e.what()));
    }
  }
  try {
    SY_ASSIGN_OR_RETURN(std::unique_ptr<BpeTokenizer> tok, BpeTokenizer::Build(j, config, name));
    return std::unique_ptr<Tokenizer>(std::move(tok));
  } catch (const json::exception& e) {
    // A field of the wrong JSON type (a string where a number belongs, ...).
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", e.what()));
  }
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  SY_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  const size_t slash = path.find_last_of('/');
  const std::string config_path =
      (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) +
      "tokenizer_config.json";
  std::string config_text;
  if (std::ifstream(config_path).good()) {
    SY_ASSIGN_OR_RETURN(config_text, ReadFile(config_path));
  }
  return Load(text, config_text, path, config_path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const std::string& json_text) {
  return Load(json_text, "", "tokenizer.json (inline)", "");
}

}  // namespace sy::model
