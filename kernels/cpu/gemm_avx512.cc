// AVX-512 / AVX-512-BF16 kernels of the fast CPU backend (see cpu_kernels.h).
//
// Everything below the target pragma (GCC's `target`, clang's `attribute push`) is compiled
// for AVX-512 only (a per-function target, not a global -march), so the rest of the binary
// keeps running on other CPUs; the backend calls these only when DetectCpuLevel() says the
// CPU has the instructions. All standard headers are included above the pragma so no library
// inline code is compiled with the AVX-512 target by accident.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/core/logging.h"

#include <immintrin.h>

// GCC 12's intrinsic headers build casts and reductions from _mm512_undefined_*(), which
// -Wuninitialized reports as uninitialised; the lanes are never read.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#endif

namespace sy::kernels::cpu {
namespace {

constexpr int64_t kPrefetchRows = 4;

// Sums each of a, b, c, d (16 lanes) into one lane of the result: [Σa, Σb, Σc, Σd].
inline __m128 Reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // Per 128-bit lane: [a, b, c, d] partial sums.
  __m512 abcd = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int NR>
inline void StoreTileRow(const __m512* acc, float* y, const float* bias) {
  if constexpr (NR == 4) {
    __m128 s = Reduce4(acc[0], acc[1], acc[2], acc[3]);
    if (bias) s = _mm_add_ps(s, _mm_loadu_ps(bias));
    _mm_storeu_ps(y, s);
  } else {
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) y[r] = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[r] : 0.f);
  }
}

// ---- bf16 x bf16 -> f32 (vdpbf16ps) ---------------------------------------------------------
// One register tile: MT tokens x NR weight rows, over the whole K.
template <int MT, int NR, bool kAddressOrder>
inline void TileBf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t k,
                     float* y, int64_t ldy, const float* bias) {
  __m512 acc[MT][NR];
  #pragma GCC unroll 16
  for (int t = 0; t < MT; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_setzero_ps();
  // Prefetch of the next tile, NR lines per step, so that it is all requested by the time
  // this tile ends (1.5-1.9x over no prefetch on weights streamed from DRAM): with
  // kAddressOrder the next NR rows front to back, else each next row at this column (see
  // RowsBf16 for which wins where). Past the last row it touches only nearby addresses (a
  // prefetch never faults).
  auto prefetch = [&](int64_t kk) {
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      if constexpr (kAddressOrder) {
        _mm_prefetch(reinterpret_cast<const char*>(w + NR * ldw) + kk * NR * 2 + r * 64, _MM_HINT_T0);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * ldw + kk), _MM_HINT_T0);
      }
    }
  };
  int64_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
    __m512bh wv[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * ldw + kk);
    prefetch(kk);
    #pragma GCC unroll 16
    for (int t = 0; t < MT; ++t) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * ldx + kk);
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
    }
  }
  if (kk < k) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (k - kk)) - 1);
    __m512bh wv[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * ldw + kk);
    #pragma GCC unroll 16
    for (int t = 0; t < MT; ++t) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * ldx + kk);
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < MT; ++t) StoreTileRow<NR>(acc[t], y + t * ldy, bias);
}

// One token against one weight row, read front to back with four independent accumulators.
// For a single token this order streams memory faster than a 4-row tile: the 4-row tile reads
// four rows interleaved, which the hardware prefetchers follow poorly (single-thread GEMV on
// weights streamed from DRAM: 92 % of a plain sequential read vs 70-82 % for the 4-row tile,
// KERNEL_NOTES.md, "batch-1 row order").
inline float RowDotBf16(const uint16_t* x, const uint16_t* w, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t kk = 0;
  for (; kk + 128 <= k; kk += 128) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + kk), (__m512bh)_mm512_loadu_si512(w + kk));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + kk + 32),
                          (__m512bh)_mm512_loadu_si512(w + kk + 32));
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + kk + 64),
                          (__m512bh)_mm512_loadu_si512(w + kk + 64));
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(x + kk + 96),
                          (__m512bh)_mm512_loadu_si512(w + kk + 96));
  }
  for (; kk < k; kk += 32) {
    const int64_t left = std::min<int64_t>(32, k - kk);
    const __mmask32 m = static_cast<__mmask32>(left == 32 ? ~0u : (1u << left) - 1);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + kk),
                          (__m512bh)_mm512_maskz_loadu_epi16(m, w + kk));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <int MT>
inline void RowsBf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t k,
                     int64_t nrows, float* y, int64_t ldy, const float* bias) {
  if constexpr (MT == 1) {
    for (int64_t j = 0; j < nrows; ++j) y[j] = RowDotBf16(x, w + j * ldw, k) + (bias ? bias[j] : 0.f);
    return;
  }
  // Prefetch order (KERNEL_NOTES.md, "prefetch order"): address order is 4-9 % faster at 2-4
  // tokens on rows of k <= 1024 and at 2 tokens on longer rows; by column is 1-4 % faster at
  // 3-4 tokens on 2816-long rows and at 6+ tokens, where the tile is compute-bound.
  const bool address_order = MT <= 2 || (MT <= 5 && k <= 1024);
  int64_t j = 0;
  for (; j + 4 <= nrows; j += 4) {
    if (address_order) {
      TileBf16<MT, 4, true>(x, ldx, w + j * ldw, ldw, k, y + j, ldy, bias ? bias + j : nullptr);
    } else {
      TileBf16<MT, 4, false>(x, ldx, w + j * ldw, ldw, k, y + j, ldy, bias ? bias + j : nullptr);
    }
  }
  for (; j < nrows; ++j) {
    TileBf16<MT, 1, false>(x, ldx, w + j * ldw, ldw, k, y + j, ldy, bias ? bias + j : nullptr);
  }
}

constexpr int kTileTokens = 8;
constexpr int64_t kLargeTileMinTokens = 24;
constexpr int kTileTokensF32 = 6;

// The last `mt` (< kTileTokens) tokens.
template <int MT>
inline void TailBf16(int64_t mt, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                     int64_t k, int64_t nrows, float* y, int64_t ldy, const float* bias) {
  if constexpr (MT >= 1) {
    if (mt == MT) return RowsBf16<MT>(x, ldx, w, ldw, k, nrows, y, ldy, bias);
    return TailBf16<MT - 1>(mt, x, ldx, w, ldw, k, nrows, y, ldy, bias);
  }
}

// ---- f32 x {f32, bf16, f16} -> f32 (FMA) ----------------------------------------------------
template <DType W>
inline __m512 LoadW16(const void* w, int64_t i) {
  if constexpr (W == DType::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  } else if constexpr (W == DType::kBF16) {
    __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    return _mm512_cvtph_ps(h);
  }
}

template <DType W>
inline __m512 MaskLoadW16(__mmask16 m, const void* w, int64_t i) {
  if constexpr (W == DType::kF32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(w) + i);
  } else if constexpr (W == DType::kBF16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + i);
    return _mm512_cvtph_ps(h);
  }
}

template <DType W>
inline const void* RowPtr(const void* w, int64_t row, int64_t ldw) {
  return static_cast<const uint8_t*>(w) + row * ldw * (W == DType::kF32 ? 4 : 2);
}

// kAddressOrder: prefetch the next NR rows front to back (as TileBf16) instead of each next
// row at this column; RowsF32 picks.
template <DType W, int MT, int NR, bool kAddressOrder>
inline void TileF32(const float* x, int64_t ldx, const void* w, int64_t ldw, int64_t k,
                    float* y, int64_t ldy, const float* bias) {
  __m512 acc[MT][NR];
  #pragma GCC unroll 16
  for (int t = 0; t < MT; ++t)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_setzero_ps();
  const void* rows[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) rows[r] = RowPtr<W>(w, r, ldw);
  int64_t kk = 0;
  constexpr int64_t kElem = W == DType::kF32 ? 4 : 2;
  for (; kk + 16 <= k; kk += 16) {
    __m512 wv[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) wv[r] = LoadW16<W>(rows[r], kk);
    if (kElem == 4 || (kk & 31) == 0) {  // one prefetch per 64-byte line
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        if constexpr (kAddressOrder) {
          _mm_prefetch(static_cast<const char*>(rows[0]) + NR * ldw * kElem + kk * kElem * NR + r * 64,
                       _MM_HINT_T0);
        } else {
          _mm_prefetch(static_cast<const char*>(rows[r]) + (kPrefetchRows * ldw + kk) * kElem,
                       _MM_HINT_T0);
        }
      }
    }
    #pragma GCC unroll 16
    for (int t = 0; t < MT; ++t) {
      __m512 xv = _mm512_loadu_ps(x + t * ldx + kk);
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  if (kk < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - kk)) - 1);
    __m512 wv[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) wv[r] = MaskLoadW16<W>(m, rows[r], kk);
    #pragma GCC unroll 16
    for (int t = 0; t < MT; ++t) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + kk);
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < MT; ++t) StoreTileRow<NR>(acc[t], y + t * ldy, bias);
}

// One token against one weight row, front to back, four accumulators (see RowDotBf16).
template <DType W>
inline float RowDotF32(const float* x, const void* w, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t kk = 0;
  for (; kk + 64 <= k; kk += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + kk), LoadW16<W>(w, kk), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + kk + 16), LoadW16<W>(w, kk + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + kk + 32), LoadW16<W>(w, kk + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + kk + 48), LoadW16<W>(w, kk + 48), a3);
  }
  for (; kk < k; kk += 16) {
    const int64_t left = std::min<int64_t>(16, k - kk);
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + kk), MaskLoadW16<W>(m, w, kk), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <DType W, int MT>
inline void RowsF32(const float* x, int64_t ldx, const void* w, int64_t ldw, int64_t k,
                    int64_t nrows, float* y, int64_t ldy, const float* bias) {
  if constexpr (MT == 1) {
    for (int64_t j = 0; j < nrows; ++j)
      y[j] = RowDotF32<W>(x, RowPtr<W>(w, j, ldw), k) + (bias ? bias[j] : 0.f);
    return;
  }
  // Prefetch order (KERNEL_NOTES.md, "prefetch order"): address order is 6-8 % faster at 2-5
  // tokens on rows of k <= 1024 and neutral to worse on 2816-long rows.
  const bool address_order = MT <= 5 && k <= 1024;
  int64_t j = 0;
  for (; j + 4 <= nrows; j += 4) {
    if (address_order) {
      TileF32<W, MT, 4, true>(x, ldx, RowPtr<W>(w, j, ldw), ldw, k, y + j, ldy,
                              bias ? bias + j : nullptr);
    } else {
      TileF32<W, MT, 4, false>(x, ldx, RowPtr<W>(w, j, ldw), ldw, k, y + j, ldy,
                               bias ? bias + j : nullptr);
    }
  }
  for (; j < nrows; ++j) {
    TileF32<W, MT, 1, false>(x, ldx, RowPtr<W>(w, j, ldw), ldw, k, y + j, ldy,
                             bias ? bias + j : nullptr);
  }
}

template <DType W, int MT>
inline void TailF32(int64_t mt, const float* x, int64_t ldx, const void* w, int64_t ldw,
                    int64_t k, int64_t nrows, float* y, int64_t ldy, const float* bias) {
  if constexpr (MT >= 1) {
    if (mt == MT) return RowsF32<W, MT>(x, ldx, w, ldw, k, nrows, y, ldy, bias);
    return TailF32<W, MT - 1>(mt, x, ldx, w, ldw, k, nrows, y, ldy, bias);
  }
}

template <DType W>
void DotRowsF32Typed(const float* x, int64_t ldx, int64_t T, const void* w, int64_t ldw,
                     int64_t k, int64_t nrows, float* y, int64_t ldy, const float* bias) {
  // Weight rows in blocks that stay in L2 (~256 KiB) while every token tile passes over them.
  const int64_t row_bytes = k * (W == DType::kF32 ? 4 : 2);
  const int64_t block = std::max<int64_t>(4, (256 * 1024 / std::max<int64_t>(1, row_bytes)) & ~3);
  for (int64_t nb = 0; nb < nrows; nb += block) {
    const int64_t nn = std::min(block, nrows - nb);
    const void* wb = RowPtr<W>(w, nb, ldw);
    const float* bb = bias ? bias + nb : nullptr;
    int64_t t = 0;
    for (; t + kTileTokensF32 <= T; t += kTileTokensF32) {
      RowsF32<W, kTileTokensF32>(x + t * ldx, ldx, wb, ldw, k, nn, y + t * ldy + nb, ldy, bb);
    }
    if (t < T) {
      TailF32<W, kTileTokensF32 - 1>(T - t, x + t * ldx, ldx, wb, ldw, k, nn, y + t * ldy + nb,
                                     ldy, bb);
    }
  }
}

// e^x for f32 lanes: range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial,
// scaled by 2^n (vscalefps). Relative error ~2e-7 over [-87, 88]; underflows to 0.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-104.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 Silu(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), Exp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

}  // namespace

void ConvertRowsToBf16Avx512(const float* src, int64_t rows, int64_t k, int64_t ld_src,
                             uint16_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    uint16_t* d = dst + r * ld_dst;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + i + 16), _mm512_loadu_ps(s + i));
      _mm512_storeu_si512(d + i, (__m512i)v);
    }
    for (; i < ld_dst; i += 16) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, k - i));
      const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
      __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), (__m256i)v);
    }
  }
}

namespace {

template <int MT>
void DotRowsBf16Tiled(const uint16_t* x, int64_t ldx, int64_t T, const uint16_t* w,
                      int64_t ldw, int64_t k, int64_t nrows, float* y, int64_t ldy,
                      const float* bias) {
  const int64_t block = std::max<int64_t>(4, (256 * 1024 / std::max<int64_t>(1, 2 * k)) & ~3);
  for (int64_t nb = 0; nb < nrows; nb += block) {
    const int64_t nn = std::min(block, nrows - nb);
    const uint16_t* wb = w + nb * ldw;
    const float* bb = bias ? bias + nb : nullptr;
    int64_t t = 0;
    for (; t + MT <= T; t += MT) {
      RowsBf16<MT>(x + t * ldx, ldx, wb, ldw, k, nn, y + t * ldy + nb, ldy, bb);
    }
    if (t < T) TailBf16<MT - 1>(T - t, x + t * ldx, ldx, wb, ldw, k, nn, y + t * ldy + nb, ldy, bb);
  }
}

}  // namespace

void DotRowsBf16Avx512(const uint16_t* x, int64_t ldx, int64_t T, const uint16_t* w,
                       int64_t ldw, int64_t k, int64_t nrows, float* y, int64_t ldy,
                       const float* bias) {
  // 8-token tiles while the weights stream from memory at a few tokens per row (batched
  // decode); 6-token tiles (no accumulator spills) when the call is compute-bound.
  if (T >= kLargeTileMinTokens) {
    DotRowsBf16Tiled<6>(x, ldx, T, w, ldw, k, nrows, y, ldy, bias);
  } else {
    DotRowsBf16Tiled<kTileTokens>(x, ldx, T, w, ldw, k, nrows, y, ldy, bias);
  }
}

void DotRowsF32Avx512(const float* x, int64_t ldx, int64_t T, const void* w, DType wdt,
                      int64_t ldw, int64_t k, int64_t nrows, float* y, int64_t ldy,
                      const float* bias) {
  switch (wdt) {
    case DType::kF32:
      return DotRowsF32Typed<DType::kF32>(x, ldx, T, w, ldw, k, nrows, y, ldy, bias);
    case DType::kBF16:
      return DotRowsF32Typed<DType::kBF16>(x, ldx, T, w, ldw, k, nrows, y, ldy, bias);
    case DType::kF16:
      return DotRowsF32Typed<DType::kF16>(x, ldx, T, w, ldw, k, nrows, y, ldy, bias);
  }
}

void SiluMulAvx512(const float* g, const float* u, int64_t n, float* out_f32,
                   uint16_t* out_bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
    __m512 h = _mm512_mul_ps(Silu(_mm512_maskz_loadu_ps(m, g + i)), _mm512_maskz_loadu_ps(m, u + i));
    if (out_bf16) {
      _mm256_mask_storeu_epi16(out_bf16 + i, m, (__m256i)_mm512_cvtneps_pbh(h));
    } else {
      _mm512_mask_storeu_ps(out_f32 + i, m, h);
    }
  }
}

void RmsNormAvx512(const float* x, int64_t rows, int64_t dim, const float* w, float eps,
                   float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
      const __mmask16 m = static_cast<__mmask16>(dim - i >= 16 ? 0xffff : (1u << (dim - i)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(dim) + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t i = 0; i < dim; i += 16) {
      const __mmask16 m = static_cast<__mmask16>(dim - i >= 16 ? 0xffff : (1u << (dim - i)) - 1);
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), vinv),
                               _mm512_maskz_loadu_ps(m, w + i));
      _mm512_mask_storeu_ps(yr + i, m, v);
    }
  }
}

void AttendOneAvx512(const float* q, const float* const* k_rows, const float* const* v_rows,
                     int64_t len, int64_t head_dim, float scale, float* scores, float* out) {
  // Scores. Fast path (head_dim a multiple of 16, at most 128): q stays in registers and
  // four keys are reduced together.
  float mx = -INFINITY;
  int64_t p = 0;
  if (head_dim % 16 == 0 && head_dim <= 128) {
    const int64_t nv = head_dim / 16;
    __m512 qv[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) qv[c] = c < nv ? _mm512_loadu_ps(q + 16 * c) : _mm512_setzero_ps();
    const __m128 vscale = _mm_set1_ps(scale);
    __m128 vmax = _mm_set1_ps(-INFINITY);
    for (; p + 4 <= len; p += 4) {
      __m512 acc[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const float* kp = k_rows[p + j];
        __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp));
        for (int64_t c = 1; c < nv; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kp + 16 * c), a);
        acc[j] = a;
      }
      const __m128 s4 = _mm_mul_ps(Reduce4(acc[0], acc[1], acc[2], acc[3]), vscale);
      _mm_storeu_ps(scores + p, s4);
      vmax = _mm_max_ps(vmax, s4);
    }
    alignas(16) float m4[4];
    _mm_store_ps(m4, vmax);
    mx = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
  }
  for (; p < len; ++p) {
    const float* kp = k_rows[p];
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 16) {
      const __mmask16 m =
          static_cast<__mmask16>(head_dim - d >= 16 ? 0xffff : (1u << (head_dim - d)) - 1);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, kp + d), acc);
    }
    scores[p] = _mm512_reduce_add_ps(acc) * scale;
    mx = std::max(mx, scores[p]);
  }
  // Softmax numerators, vectorised exp.
  __m512 vsum = _mm512_setzero_ps();
  const __m512 vmx = _mm512_set1_ps(mx);
  for (int64_t p = 0; p < len; p += 16) {
    const __mmask16 m = static_cast<__mmask16>(len - p >= 16 ? 0xffff : (1u << (len - p)) - 1);
    __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + p), vmx));
    e = _mm512_maskz_mov_ps(m, e);
    _mm512_mask_storeu_ps(scores + p, m, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(vsum);
  // Weighted sum of values, head_dim up to 256 in registers (4 x 16 lanes per step of 64).
  for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    __mmask16 masks[4];
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) {
      const int64_t d = d0 + 16 * c;
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, head_dim - d));
      masks[c] = static_cast<__mmask16>((1u << left) - 1);
    }
    for (int64_t p = 0; p < len; ++p) {
      const __m512 wp = _mm512_set1_ps(scores[p]);
      const float* vp = v_rows[p] + d0;
      #pragma GCC unroll 16
      for (int c = 0; c < 4; ++c) {
        if (masks[c]) acc[c] = _mm512_fmadd_ps(wp, _mm512_maskz_loadu_ps(masks[c], vp + 16 * c), acc[c]);
      }
    }
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) {
      if (masks[c]) {
        _mm512_mask_storeu_ps(out + d0 + 16 * c, masks[c], _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
      }
    }
  }
}

}  // namespace sy::kernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
