// WriteSyntheticTokenizer: a real, loadable tokenizer.json for synthetic checkpoints.
//
// Vocabulary layout (ids): 0 <unk>, 1 <s>, 2 </s>, then the 256 byte tokens (byte-level: the
// GPT-2 character of each byte; SentencePiece: <0x00>..<0xFF>, then "▁" and the characters of
// the built-in text, most frequent first), then tokens made by BPE merges learnt from the
// built-in English text below. When the text has no pairs left to merge, padding merges join
// pairs of the tokens seen in the text (most frequent first); past that, filler tokens
// "<filler_N>" make the size exact. Byte tokens make every UTF-8 string encodable, so
// Decode(Encode(s)) == s.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <queue>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"
#include "model/tokenizer.h"
#include "model/tokenizer_internal.h"
#include "nlohmann/json.hpp"

namespace sy::model {
namespace {

namespace ti = tokenizer_internal;

constexpr char kMetaspace[] = "\xE2\x96\x81";  // "▁"
constexpr int64_t kMaxSyntheticVocab = 1 << 20;

// The training text: plain English prose (ASCII only, no '<' so no merge can spell a byte
// token), about 4 KB.
constexpr char kTrainingText[] =
    R"(A switchyard is the part of a railway where trains are taken apart and put together again.
Cars arrive from many places, each one bound for a different town, and the yard sorts them
so that every outgoing train carries only the cars that travel the same way. The work is
old, but the problem it solves is the same one that a serving system for large language
models faces every second: many small pieces of work arrive at once, and each must reach the
right place without waiting too long.
In the yard there is a hump, a small hill over which the cars are pushed one by one. Gravity
does the rest. A car rolls down the far side, and a set of switches sends it onto one of
thirty or forty tracks. At the end of the day, each track holds a train. The yard master
watches the whole thing from a tower, and he knows that the slowest track decides when the
last train can leave. If one track is full while the others are empty, the yard is badly
balanced, and the engines wait.
A mixture of experts model works in a similar way. Each token of text is a car. The router
is the hump: it looks at the token and decides which two or three experts should see it.
The experts are the tracks. When the experts live on different machines, the tokens must
travel over the network, and the machine with the most work sets the pace for all of them.
That is why the placement of experts matters so much, and why a good plan moves the busy
experts apart and keeps the ones that are often used together on the same machine.
Here are a few numbers from a test run: 8 ranks, 64 experts per layer, 2 experts per token,
and 4096 tokens in each step. With a naive layout the busiest rank served 1,843 tokens while
the quietest served 512; after the planner ran, the spread fell to 1,101 and 987. The step
time dropped from 41.5 ms to 27.25 ms, a gain of about 34 percent.
It's not magic, and it doesn't always work. If the traffic changes quickly, the plan we made
a minute ago may be wrong now, so we'll measure again and move experts while the system
keeps serving. Moving an expert isn't free: its weights are large, and the copy competes with
the all-to-all exchange for the same links. We've learned to move only what pays for itself.
The engineers who built the first yards had no computers. They had paper, telegraphs, and a
great deal of patience. They wrote rules: never block the main line, always know where every
car is, and when in doubt, stop and ask. Those rules still hold. A system that loses track of
a request, or that blocks every other request while it thinks, is a system nobody trusts.
So the daemon keeps a clear record. Every request has an id, a home rank, a list of tokens,
and a deadline. The scheduler decides which requests run in the next step, the model turns
tokens into new tokens, and the server sends the text back as soon as it is ready. When a
machine joins the group, the experts are spread again; when one leaves, its work is taken
over by the others, and the clients see a short pause instead of an error.
What should you remember? First, balance beats raw speed: a fast machine that waits is no
faster than a slow one. Second, measure before you move anything. Third, write the rules down,
test them, and keep them simple enough that the person on call at three in the morning can
follow them. The trains will keep coming; the yard should be ready for them.
)";

struct Vocab {
  std::vector<std::string> tokens;                  // by id
  absl::flat_hash_map<std::string, int32_t> index;  // string -> id
  std::vector<std::pair<int32_t, int32_t>> merges;  // in rank order

  int32_t Add(const std::string& s) {
    auto [it, inserted] = index.try_emplace(s, static_cast<int32_t>(tokens.size()));
    if (inserted) tokens.push_back(s);
    return it->second;
  }
  bool Has(const std::string& s) const { return index.contains(s); }
  int64_t size() const { return static_cast<int64_t>(tokens.size()); }
};

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// Greedy BPE training with incremental pair counts: each merge touches only the words that
// contain the merged pair. Ties go to the smaller (left id, right id). Stops when the vocab
// holds `target` tokens or no pair is left. Returns the ids of the tokens it made.
std::vector<int32_t> LearnMerges(std::vector<std::vector<int32_t>> words,
                                 const std::vector<int64_t>& counts, int64_t target, Vocab* v) {
  absl::flat_hash_map<uint64_t, int64_t> pair_count;
  absl::flat_hash_map<uint64_t, std::vector<int32_t>> where;
  for (size_t w = 0; w < words.size(); ++w) {
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t key = PairKey(words[w][i], words[w][i + 1]);
      pair_count[key] += counts[w];
      where[key].push_back(static_cast<int32_t>(w));
    }
  }
  // Max-heap on count, then the smallest key (left id, then right id).
  using Entry = std::pair<int64_t, uint64_t>;
  auto cmp = [](const Entry& x, const Entry& y) {
    return x.first != y.first ? x.first < y.first : x.second > y.second;
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(cmp)> heap(cmp);
  for (const auto& [key, c] : pair_count) heap.push({c, key});

  std::vector<int32_t> made;
  std::vector<int32_t> seen_stamp(words.size(), -1);
  int32_t step = 0;
  while (v->size() < target && !heap.empty()) {
    const auto [c, key] = heap.top();
    heap.pop();
    auto pc = pair_count.find(key);
    const int64_t now = pc == pair_count.end() ? 0 : pc->second;
    if (now != c) {  // stale entry
      if (now > 0) heap.push({now, key});
      continue;
    }
    if (now <= 0) continue;
    const int32_t a = static_cast<int32_t>(key >> 32), b = static_cast<int32_t>(key & 0xFFFFFFFF);
    const std::string merged_str = v->tokens[a] + v->tokens[b];
    const bool fresh = !v->Has(merged_str);
    const int32_t merged = v->Add(merged_str);
    if (fresh) made.push_back(merged);
    v->merges.emplace_back(a, b);

    std::vector<int32_t> touched = std::move(where[key]);
    where.erase(key);
    absl::flat_hash_map<uint64_t, int64_t> changed;
    for (int32_t w : touched) {
      if (seen_stamp[w] == step) continue;
      seen_stamp[w] = step;
      std::vector<int32_t>& syms = words[w];
      const int64_t cw = counts[w];
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        const uint64_t k = PairKey(syms[i], syms[i + 1]);
        pair_count[k] -= cw;
        changed[k];
      }
      std::vector<int32_t> next;
      next.reserve(syms.size());
      for (size_t i = 0; i < syms.size(); ++i) {
        if (i + 1 < syms.size() && syms[i] == a && syms[i + 1] == b) {
          next.push_back(merged);
          ++i;
        } else {
          next.push_back(syms[i]);
        }
      }
      syms = std::move(next);
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        const uint64_t k = PairKey(syms[i], syms[i + 1]);
        pair_count[k] += cw;
        changed[k];
        where[k].push_back(w);
      }
    }
    for (const auto& [k, unused] : changed) {
      const int64_t cnt = pair_count[k];
      if (cnt > 0) heap.push({cnt, k});
    }
    ++step;
  }
  return made;
}

std::string Quote(const std::string& s) { return nlohmann::json(s).dump(); }

absl::Status WriteFile(const std::filesystem::path& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) {
    return absl::InternalError(
        absl::StrCat("cannot write ", path.string(), ": ", std::strerror(errno)));
  }
  out << data;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("error writing ", path.string()));
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteSyntheticTokenizer(const std::string& dir, int64_t vocab_size,
                                     TokenizerStyle style) {
  const bool sp = style == TokenizerStyle::kSentencePieceBpe;
  const int64_t base = 3 + 256 + (sp ? 1 : 0);
  if (vocab_size < base || vocab_size > kMaxSyntheticVocab) {
    return absl::InvalidArgumentError(absl::StrCat("synthetic tokenizer: vocab_size ", vocab_size,
                                                   " out of range [", base, ", ",
                                                   kMaxSyntheticVocab, "]"));
  }
  Vocab v;
  for (const char* s : {"<unk>", "<s>", "</s>"}) v.Add(s);
  const std::string text = kTrainingText;

  // Words of the training text as symbol ids, with their counts; and the symbol frequencies
  // (which order the padding merges).
  absl::flat_hash_map<std::string, int64_t> word_count;
  std::vector<std::string> word_order;  // first appearance, for determinism
  auto count_word = [&](std::string w) {
    if (w.empty()) return;
    if (word_count[w]++ == 0) word_order.push_back(std::move(w));
  };
  std::vector<std::vector<int32_t>> words;
  std::vector<int64_t> counts;
  absl::flat_hash_map<int32_t, int64_t> symbol_freq;

  if (!sp) {
    const auto& map = ti::ByteToUnicode();
    for (int b = 0; b < 256; ++b) v.Add(map[b]);
    for (auto [b, e] : ti::SplitByteLevel(text, ti::SplitOptions{})) {
      count_word(text.substr(b, e - b));
    }
    for (const std::string& w : word_order) {
      std::vector<int32_t> syms;
      for (char c : w) syms.push_back(3 + static_cast<uint8_t>(c));
      for (int32_t s : syms) symbol_freq[s] += word_count[w];
      words.push_back(std::move(syms));
      counts.push_back(word_count[w]);
    }
  } else {
    for (int b = 0; b < 256; ++b) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
      v.Add(buf);
    }
    v.Add(kMetaspace);
    // As the normalizer sees it: "▁" before the text and for every space. Words start at a
    // "▁"; a newline (encoded by byte fallback) ends one.
    std::string word;
    for (size_t i = 0; i < text.size(); ++i) {
      const char c = text[i];
      if (c == '\n') {
        count_word(std::move(word));
        word.clear();
      } else if (c == ' ') {
        count_word(std::move(word));
        word = kMetaspace;
      } else {
        if (i == 0) word = kMetaspace;
        word.push_back(c);
      }
    }
    count_word(std::move(word));
    // Alphabet: the characters of the text, most frequent first.
    absl::flat_hash_map<char, int64_t> char_freq;
    for (char c : text) {
      if (c != ' ' && c != '\n') ++char_freq[c];
    }
    std::vector<std::pair<char, int64_t>> alphabet(char_freq.begin(), char_freq.end());
    std::sort(alphabet.begin(), alphabet.end(), [](const auto& x, const auto& y) {
      return x.second != y.second ? x.second > y.second : x.first < y.first;
    });
    for (const auto& [c, f] : alphabet) {
      if (v.size() >= vocab_size) break;
      v.Add(std::string(1, c));
    }
    const int32_t meta = v.index.at(kMetaspace);
    for (const std::string& w : word_order) {
      std::vector<int32_t> syms;
      size_t pos = 0;
      if (w.compare(0, 3, kMetaspace) == 0) {
        syms.push_back(meta);
        pos = 3;
      }
      bool ok = true;
      for (; pos < w.size(); ++pos) {
        auto it = v.index.find(std::string(1, w[pos]));
        if (it == v.index.end()) {
          ok = false;  // alphabet truncated by a tiny vocab
          break;
        }
        syms.push_back(it->second);
      }
      if (!ok) continue;
      for (int32_t s : syms) symbol_freq[s] += word_count[w];
      words.push_back(std::move(syms));
      counts.push_back(word_count[w]);
    }
  }

  std::vector<int32_t> made = LearnMerges(std::move(words), counts, vocab_size, &v);

  // Padding merges: pairs of the text's symbols (most frequent first) and the learnt tokens,
  // enumerated by the sum of their positions so frequent pairs come first.
  if (v.size() < vocab_size) {
    std::vector<std::pair<int32_t, int64_t>> syms(symbol_freq.begin(), symbol_freq.end());
    std::sort(syms.begin(), syms.end(), [](const auto& x, const auto& y) {
      return x.second != y.second ? x.second > y.second : x.first < y.first;
    });
    std::vector<int32_t> list;
    for (const auto& [id, f] : syms) list.push_back(id);
    list.insert(list.end(), made.begin(), made.end());
    const int64_t n = static_cast<int64_t>(list.size());
    for (int64_t d = 0; d <= 2 * (n - 1) && v.size() < vocab_size; ++d) {
      for (int64_t i = std::max<int64_t>(0, d - (n - 1)); i <= std::min(d, n - 1); ++i) {
        const int32_t a = list[i], b = list[d - i];
        const std::string s = v.tokens[a] + v.tokens[b];
        if (v.Has(s)) continue;
        v.Add(s);
        v.merges.emplace_back(a, b);
        if (v.size() >= vocab_size) break;
      }
    }
  }
  for (int64_t k = 0; v.size() < vocab_size; ++k) v.Add(absl::StrCat("<filler_", k, ">"));

  // tokenizer.json, written by hand: nlohmann's ordered_json inserts in O(n) per key.
  std::string out;
  out.reserve(64 * vocab_size);
  out += "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n";
  out += "  \"added_tokens\": [\n";
  for (int i = 0; i < 3; ++i) {
    absl::StrAppend(&out, "    {\"id\": ", i, ", \"content\": ", Quote(v.tokens[i]),
                    ", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
                    "\"normalized\": false, \"special\": true}",
                    i < 2 ? ",\n" : "\n");
  }
  out += "  ],\n";
  if (sp) {
    absl::StrAppend(
        &out,
        "  \"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Prepend\", "
        "\"prepend\": \"",
        kMetaspace,
        "\"}, {\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": \"",
        kMetaspace, "\"}]},\n  \"pre_tokenizer\": null,\n",
        "  \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": "
        "{\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], "
        "\"pair\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": "
        "{\"id\": \"A\", \"type_id\": 0}}, {\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 1}}, "
        "{\"Sequence\": {\"id\": \"B\", \"type_id\": 1}}], \"special_tokens\": {\"<s>\": "
        "{\"id\": \"<s>\", \"ids\": [1], \"tokens\": [\"<s>\"]}}},\n",
        "  \"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Replace\", "
        "\"pattern\": {\"String\": \"",
        kMetaspace,
        "\"}, \"content\": \" \"}, {\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}, "
        "{\"type\": \"Strip\", \"content\": \" \", \"start\": 1, \"stop\": 0}]},\n");
  } else {
    out +=
        "  \"normalizer\": null,\n"
        "  \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
        "\"trim_offsets\": true, \"use_regex\": true},\n"
        "  \"post_processor\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, "
        "\"trim_offsets\": false, \"use_regex\": true},\n"
        "  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, "
        "\"trim_offsets\": true, \"use_regex\": true},\n";
  }
  absl::StrAppend(&out, "  \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": ",
                  sp ? "\"<unk>\"" : "null",
                  ", \"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, "
                  "\"fuse_unk\": ",
                  sp ? "true" : "false", ", \"byte_fallback\": ", sp ? "true" : "false",
                  ", \"ignore_merges\": false,\n    \"vocab\": {\n");
  for (int64_t id = 0; id < v.size(); ++id) {
    absl::StrAppend(&out, "      ", Quote(v.tokens[id]), ": ", id,
                    id + 1 < v.size() ? ",\n" : "\n");
  }
  out += "    },\n    \"merges\": [\n";
  for (size_t m = 0; m < v.merges.size(); ++m) {
    absl::StrAppend(
        &out, "      ",
        Quote(absl::StrCat(v.tokens[v.merges[m].first], " ", v.tokens[v.merges[m].second])),
        m + 1 < v.merges.size() ? ",\n" : "\n");
  }
  out += "    ]\n  }\n}\n";

  const std::string config =
      "{\n  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\",\n  \"unk_token\": \"<unk>\",\n"
      "  \"add_bos_token\": true,\n  \"add_eos_token\": false,\n"
      "  \"clean_up_tokenization_spaces\": false,\n"
      "  \"model_max_length\": 131072,\n"
      "  \"tokenizer_class\": \"PreTrainedTokenizerFast\"\n}\n";

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  }
  SY_RETURN_IF_ERROR(WriteFile(std::filesystem::path(dir) / "tokenizer.json", out));
  SY_RETURN_IF_ERROR(WriteFile(std::filesystem::path(dir) / "tokenizer_config.json", config));
  return absl::OkStatus();
}

}  // namespace sy::model
