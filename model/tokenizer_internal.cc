// UTF-8 helpers, the GPT-2 byte map and the byte-level pre-tokenizer (see tokenizer_internal.h).
#include "model/tokenizer_internal.h"

#include <algorithm>

namespace sy::model::tokenizer_internal {

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

namespace {

// Expected length of a sequence led by `b`, 0 for a byte that can never lead one.
int LeadLength(uint8_t b) {
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b >= 0xE0 && b <= 0xEF) return 3;
  if (b >= 0xF0 && b <= 0xF4) return 4;
  return 0;
}

// Whether `b` may follow lead byte `lead` as the second byte (excludes overlongs, surrogates
// and code points past U+10FFFF).
bool ValidSecond(uint8_t lead, uint8_t b) {
  switch (lead) {
    case 0xE0:
      return b >= 0xA0 && b <= 0xBF;
    case 0xED:
      return b >= 0x80 && b <= 0x9F;
    case 0xF0:
      return b >= 0x90 && b <= 0xBF;
    case 0xF4:
      return b >= 0x80 && b <= 0x8F;
    default:
      return b >= 0x80 && b <= 0xBF;
  }
}

bool IsCont(uint8_t b) { return (b & 0xC0) == 0x80; }

}  // namespace

std::pair<uint32_t, size_t> DecodeUtf8(std::string_view s, size_t pos) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const uint8_t lead = p[pos];
  const int len = LeadLength(lead);
  if (len == 1) return {lead, 1};
  if (len == 0 || pos + len > s.size()) return {0xFFFD, 1};
  if (!ValidSecond(lead, p[pos + 1])) return {0xFFFD, 1};
  for (int k = 2; k < len; ++k) {
    if (!IsCont(p[pos + k])) return {0xFFFD, 1};
  }
  uint32_t cp = lead & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (p[pos + k] & 0x3F);
  return {cp, static_cast<size_t>(len)};
}

size_t CompleteUtf8Prefix(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  // A character still waiting for bytes starts at most 3 bytes from the end.
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const size_t pos = n - back;
    const uint8_t b = p[pos];
    if (IsCont(b)) continue;  // keep looking for the lead byte
    const int len = LeadLength(b);
    if (len <= static_cast<int>(back)) return n;  // ASCII, invalid lead, or complete
    // `back` bytes of a `len`-byte character: incomplete if what is there is a valid start.
    if (back >= 2 && !ValidSecond(b, p[pos + 1])) return n;
    return pos;
  }
  return n;
}

std::string ToValidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (pos < s.size()) {
    auto [cp, len] = DecodeUtf8(s, pos);
    if (cp == 0xFFFD && len == 1) {
      out += "\xEF\xBF\xBD";
    } else {
      out.append(s.substr(pos, len));
    }
    pos += len;
  }
  return out;
}

namespace {

struct ByteMaps {
  std::array<std::string, 256> to_unicode;
  std::array<int, 512> to_byte;  // code points < 0x144 cover the whole map
};

const ByteMaps& Maps() {
  static const ByteMaps maps = [] {
    ByteMaps m;
    m.to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : 256u + extra++;
      AppendUtf8(cp, &m.to_unicode[b]);
      m.to_byte[cp] = b;
    }
    return m;
  }();
  return maps;
}

}  // namespace

const std::array<std::string, 256>& ByteToUnicode() { return Maps().to_unicode; }

int UnicodeToByte(uint32_t cp) { return cp < 512 ? Maps().to_byte[cp] : -1; }

// ---- pre-tokenizer ---------------------------------------------------------------------------

namespace {

enum class Cls : uint8_t { kLetter, kDigit, kSpace, kOther };

bool IsUnicodeSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

Cls Classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return Cls::kLetter;
    if (cp >= '0' && cp <= '9') return Cls::kDigit;
    if (IsUnicodeSpace(cp)) return Cls::kSpace;
    return Cls::kOther;
  }
  if (IsUnicodeSpace(cp)) return Cls::kSpace;
  // Binary search for the last range starting at or before cp.
  const UnicodeRange* lo = kUnicodeLetterNumberRanges;
  const UnicodeRange* hi = kUnicodeLetterNumberRanges + kNumUnicodeLetterNumberRanges;
  const UnicodeRange* it = std::upper_bound(
      lo, hi, cp, [](uint32_t c, const UnicodeRange& r) { return c < r.first; });
  if (it == lo) return Cls::kOther;
  --it;
  if (cp > it->last) return Cls::kOther;
  return it->cls == 0 ? Cls::kLetter : Cls::kDigit;
}

uint32_t AsciiLower(uint32_t cp) { return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp; }

}  // namespace

std::vector<std::pair<size_t, size_t>> SplitByteLevel(std::string_view text,
                                                      const SplitOptions& opts) {
  // Code points, their classes and byte offsets (off[n] = text.size()).
  std::vector<uint32_t> cp;
  std::vector<Cls> cls;
  std::vector<size_t> off;
  cp.reserve(text.size());
  off.reserve(text.size() + 1);
  for (size_t pos = 0; pos < text.size();) {
    auto [c, len] = DecodeUtf8(text, pos);
    cp.push_back(c);
    // An invalid byte decodes to U+FFFD, a symbol (neither \p{L} nor \p{N}).
    cls.push_back(Classify(c));
    off.push_back(pos);
    pos += len;
  }
  const size_t n = cp.size();
  off.push_back(text.size());

  std::vector<std::pair<size_t, size_t>> out;
  auto emit = [&](size_t b, size_t e) { out.emplace_back(off[b], off[e]); };
  auto run_end = [&](size_t j, Cls c, size_t max_len) {
    size_t e = j;
    while (e < n && cls[e] == c && (max_len == 0 || e - j < max_len)) ++e;
    return e;
  };
  auto is_nl = [&](size_t j) { return cp[j] == '\r' || cp[j] == '\n'; };
  const bool ci = opts.style == SplitStyle::kCl100k;
  // Length in code points of a contraction ('s 't 're 've 'm 'll 'd) at i, 0 if none.
  auto contraction = [&](size_t i) -> size_t {
    if (cp[i] != '\'' || i + 1 >= n) return 0;
    auto lc = [&](size_t j) { return ci ? AsciiLower(cp[j]) : cp[j]; };
    const uint32_t a = lc(i + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 < n) {
      const uint32_t b = lc(i + 2);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    return 0;
  };
  // \s+(?!\S) | \s+ at i (cls[i] is whitespace).
  auto whitespace = [&](size_t i) {
    const size_t e = run_end(i, Cls::kSpace, 0);
    if (e == n) return n;
    return e - i >= 2 ? e - 1 : i + 1;
  };

  size_t i = 0;
  while (i < n) {
    if (size_t k = contraction(i)) {
      emit(i, i + k);
      i += k;
      continue;
    }
    size_t end;
    if (opts.style == SplitStyle::kGpt2) {
      // ' ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+' then whitespace.
      const size_t j = (cp[i] == ' ' && i + 1 < n) ? i + 1 : i;
      switch (cls[j]) {
        case Cls::kLetter:
          end = run_end(j, Cls::kLetter, 0);
          break;
        case Cls::kDigit:
          end = run_end(j, Cls::kDigit, opts.max_digits);
          break;
        case Cls::kOther:
          end = run_end(j, Cls::kOther, 0);
          break;
        default:
          end = whitespace(i);
          break;
      }
    } else {
      const Cls c0 = cls[i];
      if (c0 == Cls::kLetter) {
        end = run_end(i, Cls::kLetter, 0);
      } else if (c0 != Cls::kDigit && !is_nl(i) && i + 1 < n && cls[i + 1] == Cls::kLetter) {
        end = run_end(i + 1, Cls::kLetter, 0);  // [^\r\n\p{L}\p{N}]?\p{L}+
      } else if (c0 == Cls::kDigit) {
        end = run_end(i, Cls::kDigit, opts.max_digits);
      } else if (c0 == Cls::kOther || (cp[i] == ' ' && i + 1 < n && cls[i + 1] == Cls::kOther)) {
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        end = run_end(c0 == Cls::kOther ? i : i + 1, Cls::kOther, 0);
        while (end < n && is_nl(end)) ++end;
      } else {
        // '\s*[\r\n]+': up to the last newline of the whitespace run, else \s+(?!\S) | \s+.
        const size_t e = run_end(i, Cls::kSpace, 0);
        size_t last_nl = n;
        for (size_t j = i; j < e; ++j) {
          if (is_nl(j)) last_nl = j;
        }
        end = last_nl != n ? last_nl + 1 : whitespace(i);
      }
    }
    emit(i, end);
    i = end;
  }
  return out;
}

}  // namespace sy::model::tokenizer_internal
