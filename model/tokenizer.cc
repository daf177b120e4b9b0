// Tokenizer: BPE encoding, decoding and streaming of the BpeTokenizer that tokenizer_json.cc
// loads (see tokenizer_bpe.h for the two families it covers). The JSON sections set flags at
// load; the per-call code here is the same for both.
#include "model/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <queue>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "model/tokenizer_bpe.h"
#include "model/tokenizer_internal.h"

namespace sy::model {
namespace tokenizer_internal {

void ReplaceAll(std::string* s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  while (true) {
    size_t hit = s->find(from, pos);
    if (hit == std::string::npos) break;
    out.append(*s, pos, hit - pos);
    out += to;
    pos = hit + from.size();
  }
  if (pos == 0) return;
  out.append(*s, pos, std::string::npos);
  *s = std::move(out);
}

namespace {

absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

}  // namespace

// ---- encoding ----------------------------------------------------------------------------------

std::vector<int32_t> BpeTokenizer::Encode(const std::string& text, bool add_bos) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && bos_) out.push_back(*bos_);
  size_t seg_start = 0, pos = 0;
  while (pos < text.size()) {
    const auto& cands = added_by_first_byte_[static_cast<uint8_t>(text[pos])];
    const AddedToken* hit = nullptr;
    for (int32_t c : cands) {
      const std::string& s = added_[c].content;
      if (text.compare(pos, s.size(), s) == 0) {
        hit = &added_[c];
        break;
      }
    }
    if (hit == nullptr) {
      ++pos;
      continue;
    }
    size_t seg_end = pos, tok_end = pos + hit->content.size();
    if (hit->lstrip) {
      while (seg_end > seg_start && IsAsciiSpace(text[seg_end - 1])) --seg_end;
    }
    if (hit->rstrip) {
      while (tok_end < text.size() && IsAsciiSpace(text[tok_end])) ++tok_end;
    }
    if (seg_end > seg_start) {
      EncodeSegment(std::string_view(text).substr(seg_start, seg_end - seg_start), seg_start == 0,
                    &out);
    }
    out.push_back(hit->id);
    pos = seg_start = tok_end;
  }
  if (seg_start < text.size()) {
    EncodeSegment(std::string_view(text).substr(seg_start), seg_start == 0, &out);
  }
  return out;
}

void BpeTokenizer::EncodeSegment(std::string_view seg, bool at_text_start,
                                 std::vector<int32_t>* out) const {
  std::string s(seg);
  for (const NormOp& op : norm_) {
    switch (op.kind) {
      case NormOp::kPrepend:
        if (!s.empty()) s.insert(0, op.a);
        break;
      case NormOp::kReplace:
        ReplaceAll(&s, op.a, op.b);
        break;
      case NormOp::kLowercase:
        for (char& c : s) {
          if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
        }
        break;
    }
  }
  if (byte_level_) {
    if (byte_level_prefix_space_ && !s.empty() && s[0] != ' ') s.insert(0, " ");
    if (!split_) {
      EncodeByteLevelWord(s, out);
      return;
    }
    for (auto [b, e] : ti::SplitByteLevel(s, *split_)) {
      EncodeByteLevelWord(std::string_view(s).substr(b, e - b), out);
    }
    return;
  }
  if (metaspace_) {
    ReplaceAll(&s, " ", ms_replacement_);
    const bool prepend = ms_prepend_ == PrependScheme::kAlways ||
                         (ms_prepend_ == PrependScheme::kFirst && at_text_start);
    if (prepend && s.compare(0, ms_replacement_.size(), ms_replacement_) != 0) {
      s.insert(0, ms_replacement_);
    }
    if (ms_split_ && !ms_replacement_.empty()) {
      // Split before each replacement character (it starts the next word).
      size_t start = 0;
      while (start < s.size()) {
        size_t next = s.find(ms_replacement_, start + 1);
        if (next == std::string::npos) next = s.size();
        EncodeCharWord(std::string_view(s).substr(start, next - start), out);
        start = next;
      }
      return;
    }
  }
  if (!s.empty()) EncodeCharWord(s, out);
}

void BpeTokenizer::EncodeByteLevelWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    std::string mapped;
    for (char c : word) mapped += ti::ByteToUnicode()[static_cast<uint8_t>(c)];
    if (auto it = vocab_.find(AsAbsl(mapped)); it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> syms;
  syms.reserve(word.size());
  for (char c : word) {
    const int32_t id = byte_id_[static_cast<uint8_t>(c)];
    if (id >= 0)
      syms.push_back(id);
    else if (unk_)
      syms.push_back(*unk_);
  }
  Merge(&syms, out);
}

void BpeTokenizer::EncodeCharWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(AsAbsl(word)); it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> syms;
  syms.reserve(word.size());
  bool last_unk = false;
  for (size_t pos = 0; pos < word.size();) {
    const size_t len = ti::DecodeUtf8(word, pos).second;
    const std::string_view ch = word.substr(pos, len);
    pos += len;
    if (auto it = vocab_.find(AsAbsl(ch)); it != vocab_.end()) {
      syms.push_back(it->second);
      last_unk = false;
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : ch) all = all && byte_fallback_id_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        for (char c : ch) syms.push_back(byte_fallback_id_[static_cast<uint8_t>(c)]);
        last_unk = false;
        continue;
      }
    }
    if (unk_ && !(fuse_unk_ && last_unk)) syms.push_back(*unk_);
    last_unk = true;
  }
  Merge(&syms, out);
}

void BpeTokenizer::Merge(std::vector<int32_t>* syms, std::vector<int32_t>* out) const {
  const int32_t n = static_cast<int32_t>(syms->size());
  if (n < 2 || merges_.empty()) {
    out->insert(out->end(), syms->begin(), syms->end());
    return;
  }
  // Symbols form a linked list; candidate merges wait in a heap ordered by (rank, position)
  // and are checked against the current list when popped (stale entries are dropped).
  struct Node {
    int32_t id, prev, next;
  };
  struct Cand {
    int32_t rank, left, right, left_id, right_id, merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::vector<Node> nodes(n);
  for (int32_t i = 0; i < n; ++i) nodes[i] = {(*syms)[i], i - 1, i + 1 < n ? i + 1 : -1};
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](int32_t l, int32_t r) {
    const uint64_t key =
        (static_cast<uint64_t>(nodes[l].id) << 32) | static_cast<uint32_t>(nodes[r].id);
    auto it = merges_.find(key);
    if (it != merges_.end()) {
      heap.push({it->second.first, l, r, nodes[l].id, nodes[r].id, it->second.second});
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i, i + 1);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Node& l = nodes[c.left];
    if (l.id != c.left_id || l.next != c.right || nodes[c.right].id != c.right_id) continue;
    Node& r = nodes[c.right];
    l.id = c.merged;
    l.next = r.next;
    if (r.next >= 0) nodes[r.next].prev = c.left;
    r.id = -1;
    if (l.prev >= 0) consider(l.prev, c.left);
    if (l.next >= 0) consider(c.left, l.next);
  }
  for (int32_t i = 0; i >= 0; i = nodes[i].next) out->push_back(nodes[i].id);
}

// ---- decoding ----------------------------------------------------------------------------------

std::string BpeTokenizer::DecodeBytes(std::span<const int32_t> ids, bool skip_special,
                                      bool at_start) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= piece_.size()) continue;
    if (skip_special && special_[id]) continue;
    out += piece_[id];
  }
  if (at_start) {
    size_t k = 0;
    while (k < static_cast<size_t>(strip_leading_) && k < out.size() && out[k] == ' ') ++k;
    out.erase(0, k);
  }
  return out;
}

}  // namespace tokenizer_internal

// ---- streaming ---------------------------------------------------------------------------------

std::string Tokenizer::StreamDecoder::Add(int32_t id) {
  ids_.push_back(id);
  const std::span<const int32_t> all(ids_);
  const bool at_start = !continues_text_ && bytes_before_prefix_ == 0;
  const std::string prefix =
      tok_->DecodeBytes(all.subspan(prefix_offset_, read_offset_ - prefix_offset_), true, at_start);
  const std::string text = tok_->DecodeBytes(all.subspan(prefix_offset_), true, at_start);
  if (text.size() <= prefix.size()) return "";
  const std::string_view delta = std::string_view(text).substr(prefix.size());
  // Wait while the new text ends inside a UTF-8 character (a byte token of a multi-byte char).
  if (tokenizer_internal::CompleteUtf8Prefix(delta) < delta.size()) return "";
  bytes_before_prefix_ += prefix.size();
  emitted_bytes_ += delta.size();
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return tokenizer_internal::ToValidUtf8(delta);
}

std::string Tokenizer::StreamDecoder::Flush() {
  const std::span<const int32_t> all(ids_);
  const bool at_start = !continues_text_ && bytes_before_prefix_ == 0;
  const std::string prefix =
      tok_->DecodeBytes(all.subspan(prefix_offset_, read_offset_ - prefix_offset_), true, at_start);
  const std::string text = tok_->DecodeBytes(all.subspan(prefix_offset_), true, at_start);
  std::string out;
  if (text.size() > prefix.size()) {
    out = tokenizer_internal::ToValidUtf8(std::string_view(text).substr(prefix.size()));
  }
  bytes_before_prefix_ += text.size();
  emitted_bytes_ += text.size() - std::min(text.size(), prefix.size());
  prefix_offset_ = read_offset_ = ids_.size();
  return out;
}

}  // namespace sy::model
