// Internals shared by the tokenizer (tokenizer.cc) and the synthetic tokenizer writer
// (tokenizer_synthetic.cc): UTF-8 helpers, the GPT-2 bytes-to-unicode map and the hand-coded
// byte-level pre-tokenizer. Not part of the model/ API; tests may use it.
//
// Thread safety: pure functions; the byte map is built once (function-local static).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sy::model::tokenizer_internal {

// ---- UTF-8 ---------------------------------------------------------------------------------

// Appends the UTF-8 encoding of code point `cp` (< 0x110000) to `out`.
void AppendUtf8(uint32_t cp, std::string* out);

// Decodes one code point at `s[pos]`. Returns {code point, byte length}. An invalid or
// truncated sequence yields {0xFFFD, 1}: one bad byte at a time, so every input byte is
// covered by exactly one "character".
std::pair<uint32_t, size_t> DecodeUtf8(std::string_view s, size_t pos);

// Length of the longest prefix of `s` that does not end inside a UTF-8 character that the
// following bytes could still complete. Bytes that are invalid whatever follows count as
// complete (they will be shown as U+FFFD).
size_t CompleteUtf8Prefix(std::string_view s);

// `s` with every invalid byte replaced by U+FFFD (like Rust's String::from_utf8_lossy, one
// U+FFFD per bad byte).
std::string ToValidUtf8(std::string_view s);

// ---- GPT-2 byte-level alphabet ---------------------------------------------------------------

// The GPT-2 `bytes_to_unicode` map: byte b -> UTF-8 string of a printable code point
// (printable Latin-1 bytes map to themselves, the rest to U+0100 + n).
const std::array<std::string, 256>& ByteToUnicode();
// Inverse: code point -> byte, or -1 when the code point is not in the map.
int UnicodeToByte(uint32_t cp);

// ---- byte-level pre-tokenizer -------------------------------------------------------------------

// Which split regex the tokenizer.json names (recognised from its Split pattern string).
enum class SplitStyle {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,N}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  // \s*[\r\n]+|\s+(?!\S)|\s+   (GPT-4 cl100k with N=3, Qwen2 with N=1)
  kCl100k,
};

struct SplitOptions {
  SplitStyle style = SplitStyle::kGpt2;
  int max_digits = 0;  // longest digit run in one piece; 0 = unbounded
};

// Unicode general categories L* and N* as sorted, disjoint ranges (tokenizer_unicode.cc,
// generated from Unicode 14 data).
struct UnicodeRange {
  uint32_t first, last;
  uint8_t cls;  // 0 = letter \p{L}, 1 = number \p{N}
};
extern const UnicodeRange kUnicodeLetterNumberRanges[];
extern const size_t kNumUnicodeLetterNumberRanges;

// Splits `text` into pieces as the regex of `opts` would, returned as [begin, end) byte
// ranges covering `text` exactly, in order. \p{L}, \p{N} and \s follow Unicode 14 (the
// table above and the White_Space list); an invalid UTF-8 byte counts as U+FFFD, a symbol.
std::vector<std::pair<size_t, size_t>> SplitByteLevel(std::string_view text,
                                                      const SplitOptions& opts);

}  // namespace sy::model::tokenizer_internal
