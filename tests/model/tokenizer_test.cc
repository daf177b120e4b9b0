// Tests of model/tokenizer: hand-written tokenizer.json files whose ids are worked out by
// hand below, the byte-level split against the regex it imitates, streaming, and the
// synthetic tokenizer (round trip, exact size, against a naive BPE reference).
#include "model/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "model/tokenizer_internal.h"
#include "nlohmann/json.hpp"

namespace sy::model {
namespace {

namespace ti = tokenizer_internal;
using ::testing::HasSubstr;

// Byte-level BPE (GPT-2 style). "Ġ" (U+0120) is the byte-level character of ' '.
//   vocab: <|endoftext|>0 h1 e2 l3 o4 Ġ5 w6 r7 d8 he9 ll10 hell11 Ġw12 or13 Ġwor14 ld15
//   merges by rank: 0 "h e", 1 "l l", 2 "he ll", 3 "Ġ w", 4 "o r", 5 "Ġw or", 6 "l d"
// "hello world" splits (GPT-2 regex) into "hello", " world" = "Ġworld".
//   hello:  h e l l o -> (h,e)r0 -> he l l o -> (l,l)r1 -> he ll o -> (he,ll)r2 -> hell o
//           = [11, 4]
//   Ġworld: Ġ w o r l d -> (Ġ,w)r3 -> Ġw o r l d -> (o,r)r4 -> Ġw or l d -> (Ġw,or)r5
//           -> Ġwor l d -> (l,d)r6 -> Ġwor ld = [14, 15]
constexpr char kByteLevelJson[] = R"({
  "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true,
                    "lstrip": false, "rstrip": false, "normalized": false, "single_word": false}],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
  "decoder": {"type": "ByteLevel"},
  "model": {"type": "BPE",
            "vocab": {"<|endoftext|>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "Ġ": 5, "w": 6,
                      "r": 7, "d": 8, "he": 9, "ll": 10, "hell": 11, "Ġw": 12, "or": 13,
                      "Ġwor": 14, "ld": 15},
            "merges": ["h e", "l l", "he ll", "Ġ w", "o r", ["Ġw", "or"], "l d"]}
})";

// SentencePiece-style BPE with byte fallback (Mixtral / Llama layout).
//   vocab: <unk>0 <s>1 </s>2 <0xC3>3 <0xA9>4 ▁5 h6 i7 c8 a9 f10 ▁h11 ▁hi12 ca13 caf14
//          <0xF0>15 <0x9F>16 <0x98>17 <0x80>18
//   merges by rank: 0 "▁ h", 1 "▁h i", 2 "c a", 3 "ca f"
// "hi café" -> normalizer -> "▁hi▁café"; "é" (C3 A9) is not in the vocab -> <0xC3> <0xA9>:
//   ▁ h i ▁ c a f <C3> <A9> -> (▁,h)r0 -> ▁h i ▁ c a f .. -> (▁h,i)r1 -> ▁hi ▁ c a f ..
//   -> (c,a)r2 -> ▁hi ▁ ca f .. -> (ca,f)r3 -> ▁hi ▁ caf <C3> <A9> = [12, 5, 14, 3, 4]
constexpr char kSentencePieceJson[] = R"({
  "added_tokens": [
    {"id": 0, "content": "<unk>", "special": true},
    {"id": 1, "content": "<s>", "special": true},
    {"id": 2, "content": "</s>", "special": true}],
  "normalizer": {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
  "pre_tokenizer": null,
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
               {"Sequence": {"id": "A", "type_id": 0}}]},
  "decoder": {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
  "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, "▁": 5,
                      "h": 6, "i": 7, "c": 8, "a": 9, "f": 10, "▁h": 11, "▁hi": 12,
                      "ca": 13, "caf": 14, "<0xF0>": 15, "<0x9F>": 16, "<0x98>": 17,
                      "<0x80>": 18},
            "merges": ["▁ h", "▁h i", "c a", "ca f"]}
})";

std::unique_ptr<Tokenizer> MustLoad(const std::string& json) {
  auto tok = Tokenizer::FromJson(json);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

// A fresh directory under the test temp dir, removed when the test ends.
class ScopedDir {
 public:
  explicit ScopedDir(const std::string& name)
      : path_(::testing::TempDir() + "/sy_tokenizer_test_" + name + "_" +
              std::to_string(::getpid())) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScopedDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

bool IsValidUtf8(const std::string& s) { return ti::ToValidUtf8(s) == s; }

// Feeds `ids` through a StreamDecoder; every chunk must be valid UTF-8.
std::string StreamAll(const Tokenizer& tok, const std::vector<int32_t>& ids,
                      std::vector<std::string>* chunks = nullptr) {
  Tokenizer::StreamDecoder dec(&tok);
  std::string out;
  for (int32_t id : ids) {
    std::string c = dec.Add(id);
    EXPECT_TRUE(IsValidUtf8(c)) << "chunk is not valid UTF-8";
    if (chunks) chunks->push_back(c);
    out += c;
  }
  std::string rest = dec.Flush();
  if (chunks) chunks->push_back(rest);
  return out + rest;
}

// ---- byte-level ------------------------------------------------------------------------------

TEST(TokenizerByteLevel, EncodesHelloWorldWithRankedMerges) {
  auto tok = MustLoad(kByteLevelJson);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 16);
  EXPECT_EQ(tok->Encode("hello world", false), (std::vector<int32_t>{11, 4, 14, 15}));
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{11, 4, 14, 15}), "hello world");
}

TEST(TokenizerByteLevel, MatchesAddedTokensVerbatimAndSkipsThemInDecode) {
  auto tok = MustLoad(kByteLevelJson);
  ASSERT_NE(tok, nullptr);
  // "hello" | <|endoftext|> | " world"
  const std::vector<int32_t> ids = tok->Encode("hello<|endoftext|> world", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{11, 4, 0, 14, 15}));
  EXPECT_EQ(tok->Decode(ids, /*skip_special=*/true), "hello world");
  EXPECT_EQ(tok->Decode(ids, /*skip_special=*/false), "hello<|endoftext|> world");
  // No config and no <s>: EOS falls back to the well-known <|endoftext|>, BOS stays unset.
  EXPECT_EQ(tok->eos_id(), 0);
  EXPECT_EQ(tok->bos_id(), std::nullopt);
  EXPECT_EQ(tok->Encode("hello", /*add_bos=*/true), (std::vector<int32_t>{11, 4}));
}

// The expected pieces come from Python's `regex` module running the real patterns.
struct SplitCase {
  std::string text;
  std::vector<std::string> gpt2, gpt4, qwen2;
};

std::vector<std::string> Pieces(const std::string& text, ti::SplitOptions opts) {
  std::vector<std::string> out;
  for (auto [b, e] : ti::SplitByteLevel(text, opts)) out.push_back(text.substr(b, e - b));
  return out;
}

TEST(TokenizerSplit, MatchesTheGpt2Gpt4AndQwen2Regexes) {
  const std::vector<SplitCase> cases = {
      {"Hello world's 12345  ok!!\n\nbye",
       {"Hello", " world", "'s", " 12345", " ", " ok", "!!", "\n", "\n", "bye"},
       {"Hello", " world", "'s", " ", "123", "45", " ", " ok", "!!\n\n", "bye"},
       {"Hello", " world", "'s", " ", "1", "2", "3", "4", "5", " ", " ok", "!!\n\n", "bye"}},
      {"  \n  x", {"  \n ", " x"}, {"  \n", " ", " x"}, {"  \n", " ", " x"}},
      {"(hi 'S it's",
       {"(", "hi", " '", "S", " it", "'s"},
       {"(hi", " '", "S", " it", "'s"},
       {"(hi", " '", "S", " it", "'s"}},
      {"caf\xC3\xA9 \xE4\xB8\x96\xE7\x95\x8C x\xC2\xA0y",
       {"caf\xC3\xA9", " \xE4\xB8\x96\xE7\x95\x8C", " x", "\xC2\xA0", "y"},
       {"caf\xC3\xA9", " \xE4\xB8\x96\xE7\x95\x8C", " x", "\xC2\xA0y"},
       {"caf\xC3\xA9", " \xE4\xB8\x96\xE7\x95\x8C", " x", "\xC2\xA0y"}},
      {"a \t\nb  ",
       {"a", " \t", "\n", "b", "  "},
       {"a", " \t\n", "b", "  "},
       {"a", " \t\n", "b", "  "}},
      // Non-ASCII symbols, numbers and marks: 😀 (So), ½ (No), — “ ” (Pd Pi Pf), ①..④ (No),
      // Arabic-Indic digits (Nd), a combining acute (Mn), 👍🏽 (So Sk), CJK punctuation.
      {"caf\xC3\xA9 \xE4\xB8\x96\xE7\x95\x8C\xF0\x9F\x98\x80 x\xC2\xA0y",
       {"caf\xC3\xA9", " \xE4\xB8\x96\xE7\x95\x8C", "\xF0\x9F\x98\x80", " x", "\xC2\xA0", "y"},
       {"caf\xC3\xA9", " \xE4\xB8\x96\xE7\x95\x8C", "\xF0\x9F\x98\x80", " x", "\xC2\xA0y"},
       {"caf\xC3\xA9", " \xE4\xB8\x96\xE7\x95\x8C", "\xF0\x9F\x98\x80", " x", "\xC2\xA0y"}},
      {"\xC2\xBD price\xE2\x80\x94\xE2\x80\x9Cquoted\xE2\x80\x9D \xE2\x91\xA0\xE2\x91\xA1\xE2\x91\xA2"
       "\xE2\x91\xA3 \xD9\xA2\xD9\xA3\xD9\xA4\xD9\xA5 e\xCC\x81t\xC3\xA9!",
       {"\xC2\xBD", " price", "\xE2\x80\x94\xE2\x80\x9C", "quoted", "\xE2\x80\x9D",
        " \xE2\x91\xA0\xE2\x91\xA1\xE2\x91\xA2\xE2\x91\xA3", " \xD9\xA2\xD9\xA3\xD9\xA4\xD9\xA5", " e",
        "\xCC\x81", "t\xC3\xA9", "!"},
       {"\xC2\xBD", " price", "\xE2\x80\x94\xE2\x80\x9C", "quoted", "\xE2\x80\x9D", " ",
        "\xE2\x91\xA0\xE2\x91\xA1\xE2\x91\xA2", "\xE2\x91\xA3", " ", "\xD9\xA2\xD9\xA3\xD9\xA4",
        "\xD9\xA5", " e", "\xCC\x81t\xC3\xA9", "!"},
       {"\xC2\xBD", " price", "\xE2\x80\x94\xE2\x80\x9C", "quoted", "\xE2\x80\x9D", " ",
        "\xE2\x91\xA0", "\xE2\x91\xA1", "\xE2\x91\xA2", "\xE2\x91\xA3", " ", "\xD9\xA2",
        "\xD9\xA3", "\xD9\xA4", "\xD9\xA5", " e", "\xCC\x81t\xC3\xA9", "!"}},
      {"\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD ok \xE3\x80\x82\xE4\xB8\xAD\xE6\x96\x87\xEF\xBC\x8C"
       "\xE4\xB8\x96\xE7\x95\x8C\xEF\xBC\x81",
       {"\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", " ok", " \xE3\x80\x82", "\xE4\xB8\xAD\xE6\x96\x87",
        "\xEF\xBC\x8C", "\xE4\xB8\x96\xE7\x95\x8C", "\xEF\xBC\x81"},
       {"\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", " ok", " \xE3\x80\x82", "\xE4\xB8\xAD\xE6\x96\x87",
        "\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C", "\xEF\xBC\x81"},
       {"\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", " ok", " \xE3\x80\x82", "\xE4\xB8\xAD\xE6\x96\x87",
        "\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C", "\xEF\xBC\x81"}},
  };
  for (const SplitCase& c : cases) {
    EXPECT_EQ(Pieces(c.text, {ti::SplitStyle::kGpt2, 0}), c.gpt2) << c.text;
    EXPECT_EQ(Pieces(c.text, {ti::SplitStyle::kCl100k, 3}), c.gpt4) << c.text;
    EXPECT_EQ(Pieces(c.text, {ti::SplitStyle::kCl100k, 1}), c.qwen2) << c.text;
  }
}

TEST(TokenizerByteLevel, QwenSplitPatternSplitsDigitsOneByOne) {
  // Qwen2's pre_tokenizer: Split(regex) then ByteLevel without its own regex. Vocab: the
  // byte-level characters of "1", "2", "3" and the merge "1 2" (which the split must block).
  const std::string json = R"({
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"1": 0, "2": 1, "3": 2, "12": 3}, "merges": ["1 2"]}
  })";
  auto tok = MustLoad(json);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("123", false), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{3, 2}), "123");
}

// ---- SentencePiece style ---------------------------------------------------------------------

TEST(TokenizerSentencePiece, FallsBackToBytesForCharactersNotInTheVocab) {
  auto tok = MustLoad(kSentencePieceJson);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("hi café", false), (std::vector<int32_t>{12, 5, 14, 3, 4}));
  EXPECT_EQ(tok->Encode("hi café", true), (std::vector<int32_t>{1, 12, 5, 14, 3, 4}));
  // "é" alone: "▁é" -> ▁ <0xC3> <0xA9>
  EXPECT_EQ(tok->Encode("é", false), (std::vector<int32_t>{5, 3, 4}));
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{1, 12, 5, 14, 3, 4}), "hi café");
}

TEST(TokenizerSentencePiece, MatchesSpecialTokensBeforeNormalising) {
  auto tok = MustLoad(kSentencePieceJson);
  ASSERT_NE(tok, nullptr);
  // "<s>" | "hi" -> "▁hi" | "</s>"
  const std::vector<int32_t> ids = tok->Encode("<s>hi</s>", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 12, 2}));
  EXPECT_EQ(tok->Decode(ids, true), "hi");
  EXPECT_EQ(tok->Decode(ids, false), "<s> hi</s>");
  EXPECT_EQ(tok->bos_id(), 1);  // from the TemplateProcessing post-processor
  EXPECT_EQ(tok->eos_id(), 2);  // well-known name
}

TEST(TokenizerSentencePiece, UnknownCharacterWithoutByteTokensBecomesOneUnk) {
  auto tok = MustLoad(kSentencePieceJson);
  ASSERT_NE(tok, nullptr);
  // "ü" = C3 BC: <0xBC> is missing, so the whole character is <unk>; fuse_unk joins "üü".
  EXPECT_EQ(tok->Encode("h\xC3\xBC\xC3\xBC", false), (std::vector<int32_t>{11, 0}));
}

TEST(TokenizerSentencePiece, MetaspacePreTokenizerAndDecoder) {
  // Newer Llama files: Metaspace(prepend_scheme "first") instead of the normalizer.
  std::string json = kSentencePieceJson;
  nlohmann::json j = nlohmann::json::parse(json);
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "ByteFallback"}},
                    {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}}}}};
  auto tok = MustLoad(j.dump());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("hi café", false), (std::vector<int32_t>{12, 5, 14, 3, 4}));
  // "first": only the segment at the start of the text gets a "▁".
  EXPECT_EQ(tok->Encode("<s>hi", false), (std::vector<int32_t>{1, 6, 7}));
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{12, 5, 14, 3, 4}), "hi café");
}

TEST(TokenizerSentencePiece, ReadsBosAndEosFromTokenizerConfig) {
  ScopedDir scoped("config");
  const std::string& dir = scoped.path();
  WriteText(dir + "/tokenizer.json", kSentencePieceJson);
  WriteText(dir + "/tokenizer_config.json",
            R"({"bos_token": null, "eos_token": {"content": "<unk>", "special": true}})");
  auto tok = Tokenizer::FromFile(dir + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), std::nullopt);
  EXPECT_EQ((*tok)->eos_id(), 0);
  EXPECT_EQ((*tok)->Encode("hi", /*add_bos=*/true), (std::vector<int32_t>{12}));
}

// ---- streaming --------------------------------------------------------------------------------

TEST(TokenizerStream, NeverEmitsPartOfAFourByteEmoji) {
  auto tok = MustLoad(kSentencePieceJson);
  ASSERT_NE(tok, nullptr);
  // "hi😀": ▁hi <0xF0> <0x9F> <0x98> <0x80>
  const std::vector<int32_t> ids = tok->Encode("hi\xF0\x9F\x98\x80", false);
  ASSERT_EQ(ids, (std::vector<int32_t>{12, 15, 16, 17, 18}));
  std::vector<std::string> chunks;
  EXPECT_EQ(StreamAll(*tok, ids, &chunks), "hi\xF0\x9F\x98\x80");
  // Chunks: "hi" (leading space stripped), then nothing until the 4th byte arrives.
  EXPECT_EQ(chunks, (std::vector<std::string>{"hi", "", "", "", "\xF0\x9F\x98\x80", ""}));
}

TEST(TokenizerStream, FlushTurnsAnUnfinishedCharacterIntoReplacementCharacters) {
  auto tok = MustLoad(kSentencePieceJson);
  ASSERT_NE(tok, nullptr);
  Tokenizer::StreamDecoder dec(tok.get());
  EXPECT_EQ(dec.Add(12), "hi");
  EXPECT_EQ(dec.Add(15), "");
  EXPECT_EQ(dec.Add(16), "");
  EXPECT_EQ(dec.Flush(), "\xEF\xBF\xBD\xEF\xBF\xBD");  // one U+FFFD per stray byte
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{12, 15, 16}), "hi\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(TokenizerStream, LeadingSpaceIsStrippedOnlyOnceEvenAfterSkippedSpecials) {
  auto tok = MustLoad(kSentencePieceJson);
  ASSERT_NE(tok, nullptr);
  // <s> ▁ ▁hi ▁ caf: whole decode = "  hi caf" minus one leading space.
  const std::vector<int32_t> ids = {1, 5, 12, 5, 14};
  EXPECT_EQ(tok->Decode(ids), " hi caf");
  EXPECT_EQ(StreamAll(*tok, ids), " hi caf");
}

TEST(TokenizerStream, ContinuingAPromptKeepsTheLeadingSpace) {
  auto tok = MustLoad(kSentencePieceJson);
  ASSERT_NE(tok, nullptr);
  // Output ids after a prompt: ▁hi ▁ caf -> " hi caf", where Decode alone gives "hi caf".
  const std::vector<int32_t> ids = {12, 5, 14};
  EXPECT_EQ(tok->Decode(ids), "hi caf");
  Tokenizer::StreamDecoder dec(tok.get(), /*continues_text=*/true);
  std::string out;
  for (int32_t id : ids) out += dec.Add(id);
  out += dec.Flush();
  EXPECT_EQ(out, " hi caf");
  EXPECT_EQ(tok->DecodeBytes(ids, true, /*at_start=*/false), out);
}

// ---- errors ------------------------------------------------------------------------------------

TEST(TokenizerErrors, UnsupportedModelTypeNamesFileAndType) {
  ScopedDir scoped("errors");
  const std::string& dir = scoped.path();
  const std::string path = dir + "/tokenizer.json";
  WriteText(path, R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})");
  auto tok = Tokenizer::FromFile(path);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(path));
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("WordPiece"));

  auto uni = Tokenizer::FromJson(R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})");
  ASSERT_FALSE(uni.ok());
  EXPECT_EQ(uni.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(uni.status().message()), HasSubstr("Unigram"));
}

TEST(TokenizerErrors, MalformedJsonNamesTheFile) {
  ScopedDir scoped("malformed");
  const std::string& dir = scoped.path();
  const std::string path = dir + "/tokenizer.json";
  WriteText(path, R"({"model": {"type": "BPE", "vocab": {)");
  auto tok = Tokenizer::FromFile(path);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(path));
  // Wrong field types are InvalidArgument too, not an exception.
  auto bad = Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": {"a": "zero"}}})");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  auto missing = Tokenizer::FromFile(dir + "/nope.json");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(TokenizerErrors, MergeOfUnknownTokensIsRejected) {
  auto tok = Tokenizer::FromJson(
      R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}})");
  ASSERT_FALSE(tok.ok());
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("not in the vocab"));
}

// ---- synthetic tokenizer ----------------------------------------------------------------------

const std::vector<std::string>& MixedTexts() {
  static const std::vector<std::string> texts = {
      "The yard master watches the whole thing from a tower.",
      "It's 41.5 ms, not 27.25 ms!  Two  spaces,\ttabs\nand newlines\n\n",
      "Cr\xC3\xA8me br\xC3\xBBl\xC3\xA9\x65, na\xC3\xAFve fa\xC3\xA7\x61\x64\x65 \xE2\x80\x94 "
      "\xC3\x9C\x62\x65rgr\xC3\xB6\xC3\x9F\x65",
      "\xE6\xB7\xB7\xE5\x90\x88\xE4\xB8\x93\xE5\xAE\xB6\xE6\xA8\xA1\xE5\x9E\x8B "
      "\xE3\x81\x93\xE3\x82\x93\xE3\x81\xAB\xE3\x81\xA1\xE3\x81\xAF \xED\x95\x9C\xEA\xB5\xAD",
      "emoji \xF0\x9F\x98\x80\xF0\x9F\x9A\x82\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD and flags "
      "\xF0\x9F\x87\xAB\xF0\x9F\x87\xB7!",
      " leading space and trailing space ",
      "",
  };
  return texts;
}

class TokenizerSyntheticRoundTrip
    : public ::testing::TestWithParam<std::tuple<int64_t, TokenizerStyle>> {};

TEST_P(TokenizerSyntheticRoundTrip, HasExactSizeAndRoundTripsMixedText) {
  const auto [vocab, style] = GetParam();
  ScopedDir scoped("synth_" + std::to_string(vocab) +
                   (style == TokenizerStyle::kByteLevelBpe ? "_bl" : "_sp"));
  const std::string& dir = scoped.path();
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(WriteSyntheticTokenizer(dir, vocab, style).ok());
  const double write_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "WriteSyntheticTokenizer(" << vocab << "): " << write_s * 1e3 << " ms\n";

  auto loaded = Tokenizer::FromFile(dir + "/tokenizer.json");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Tokenizer& tok = **loaded;
  EXPECT_EQ(tok.vocab_size(), vocab);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  // The JSON vocab itself holds exactly `vocab` distinct ids 0..vocab-1.
  std::ifstream in(dir + "/tokenizer.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(static_cast<int64_t>(j["model"]["vocab"].size()), vocab);

  for (const std::string& s : MixedTexts()) {
    const std::vector<int32_t> ids = tok.Encode(s, /*add_bos=*/true);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids[0], 1);
    for (int32_t id : ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, vocab);
    }
    EXPECT_EQ(tok.Decode(ids), s);
    EXPECT_EQ(StreamAll(tok, ids), s);
  }
  // A long text (one SentencePiece segment of ~0.5 MB: the heap-based merge must scale).
  std::string long_text;
  while (long_text.size() < (512 << 10)) {
    for (const std::string& s : MixedTexts()) long_text += s;
  }
  const auto t1 = std::chrono::steady_clock::now();
  const std::vector<int32_t> long_ids = tok.Encode(long_text, false);
  const double encode_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  std::cout << "Encode: " << long_text.size() / encode_s / 1e6 << " MB/s, "
            << static_cast<double>(long_text.size()) / long_ids.size() << " bytes/token\n";
  EXPECT_EQ(tok.Decode(long_ids), long_text);
  EXPECT_EQ(StreamAll(tok, long_ids), long_text);

  // Merges learnt from English text make English text shorter than its bytes.
  const std::string english = MixedTexts()[0];
  EXPECT_LT(tok.Encode(english, false).size(), english.size() * 6 / 10);
}

INSTANTIATE_TEST_SUITE_P(TokenizerSizes, TokenizerSyntheticRoundTrip,
                         ::testing::Combine(::testing::Values<int64_t>(512, 32000),
                                            ::testing::Values(TokenizerStyle::kByteLevelBpe,
                                                              TokenizerStyle::kSentencePieceBpe)));

TEST(TokenizerSynthetic, RejectsAVocabTooSmallForTheByteTokens) {
  ScopedDir scoped("small");
  const std::string& dir = scoped.path();
  EXPECT_EQ(WriteSyntheticTokenizer(dir, 100, TokenizerStyle::kByteLevelBpe).code(),
            absl::StatusCode::kInvalidArgument);
}

// Plain reference BPE: repeatedly merge the best-ranked adjacent pair (leftmost on ties).
std::vector<int32_t> NaiveBpe(
    std::vector<int32_t> syms,
    const std::map<std::pair<int32_t, int32_t>, std::pair<int, int32_t>>& merges) {
  while (true) {
    int best_rank = -1;
    size_t best_pos = 0;
    for (size_t i = 0; i + 1 < syms.size(); ++i) {
      auto it = merges.find({syms[i], syms[i + 1]});
      if (it != merges.end() && (best_rank < 0 || it->second.first < best_rank)) {
        best_rank = it->second.first;
        best_pos = i;
      }
    }
    if (best_rank < 0) return syms;
    syms[best_pos] = merges.at({syms[best_pos], syms[best_pos + 1]}).second;
    syms.erase(syms.begin() + best_pos + 1);
  }
}

TEST(TokenizerSynthetic, SentencePieceEncodeMatchesANaiveBpeReference) {
  ScopedDir scoped("naive");
  const std::string& dir = scoped.path();
  ASSERT_TRUE(WriteSyntheticTokenizer(dir, 2000, TokenizerStyle::kSentencePieceBpe).ok());
  auto loaded = Tokenizer::FromFile(dir + "/tokenizer.json");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::ifstream in(dir + "/tokenizer.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  std::map<std::string, int32_t> vocab;
  for (const auto& [k, v] : j["model"]["vocab"].items()) vocab[k] = v.get<int32_t>();
  std::map<std::pair<int32_t, int32_t>, std::pair<int, int32_t>> merges;
  int rank = 0;
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const size_t sp = s.find(' ');
    const std::string a = s.substr(0, sp), b = s.substr(sp + 1);
    merges.emplace(std::make_pair(vocab.at(a), vocab.at(b)),
                   std::make_pair(rank++, vocab.at(a + b)));
  }
  // Random strings over a small alphabet (ASCII letters, space, 'é') exercise long words.
  std::mt19937 rng(7);
  const std::vector<std::string> alphabet = {"e", "t", "a",  "o",        "n", " ", "h",
                                             "s", "r", "th", "\xC3\xA9", "E", "x"};
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    const int len = 1 + static_cast<int>(rng() % 60);
    for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
    // Reference: normalise ("▁" + text, spaces -> "▁"), characters -> ids / byte fallback.
    std::string norm = "\xE2\x96\x81";
    for (char c : text) norm += c == ' ' ? std::string("\xE2\x96\x81") : std::string(1, c);
    std::vector<int32_t> syms;
    for (size_t pos = 0; pos < norm.size();) {
      const size_t n = ti::DecodeUtf8(norm, pos).second;
      const std::string ch = norm.substr(pos, n);
      pos += n;
      if (auto it = vocab.find(ch); it != vocab.end()) {
        syms.push_back(it->second);
      } else {
        for (unsigned char c : ch) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "<0x%02X>", c);
          syms.push_back(vocab.at(buf));
        }
      }
    }
    EXPECT_EQ((*loaded)->Encode(text, false), NaiveBpe(syms, merges)) << text;
  }
}

}  // namespace
}  // namespace sy::model
