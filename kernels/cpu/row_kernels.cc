#include "kernels/cpu/row_kernels.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "kernels/core/logging.h"
#include "kernels/cpu/cpu_kernels.h"

#include <immintrin.h>

namespace sy::kernels::cpu {
namespace {


// ---- portable -------------------------------------------------------------------------------
// Branch-free RNE so the loops vectorise; NaN stays (quiet) NaN.
inline uint16_t ToBf16One(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}
inline float FromBf16One(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void RowToBf16Portable(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ToBf16One(src[i]);
}
void RowFromBf16Portable(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FromBf16One(src[i]);
}

// Column blocks of kBlock keep the accumulator in L1 while each input row streams once.
constexpr int64_t kBlock = 256;

template <bool kPartsBf16>
void SumRowsPortable(const RowSum& s, int64_t n, float* out_f32, uint16_t* out_bf16) {
  float acc[kBlock];
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t m = std::min(kBlock, n - c0);
    std::fill(acc, acc + m, 0.f);
    for (int i = 0; i < s.num_y; ++i) {
      const float* y = s.y[i] + c0;
      const float w = s.w[i];
      for (int64_t c = 0; c < m; ++c) acc[c] += w * y[c];
    }
    for (int j = 0; j < s.num_parts; ++j) {
      if constexpr (kPartsBf16) {
        const uint16_t* p = static_cast<const uint16_t*>(s.parts[j]) + c0;
        for (int64_t c = 0; c < m; ++c) acc[c] += FromBf16One(p[c]);
      } else {
        const float* p = static_cast<const float*>(s.parts[j]) + c0;
        for (int64_t c = 0; c < m; ++c) acc[c] += p[c];
      }
    }
    if (out_bf16 != nullptr) {
      RowToBf16Portable(acc, m, out_bf16 + c0);
    } else {
      std::memcpy(out_f32 + c0, acc, m * sizeof(float));
    }
  }
}

}  // namespace
}  // namespace sy::kernels::cpu

// ---- AVX-512 ---------------------------------------------------------------------------------
// Per-function target (as kernels/cpu/gemm_avx512.cc): the binary still runs on CPUs without
// AVX-512; these are only called when DetectCpuLevel() says the instructions exist.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#endif

namespace sy::kernels::cpu {
namespace {

// Software prefetch kAhead elements ahead in every input row. The rows the dispatcher reads
// are scattered 4 KiB pieces (one per token or pair), and the hardware prefetchers do not
// cross 4 KiB pages, so each row would start with a run of demand misses; measured on the
// 2-core host: the pre-sum 2.0 → 0.8 ms, the merge 3.0 → 2.1 ms (4096 tokens × 1024).
// Prefetching past the end of a row is harmless (a prefetch never faults).
constexpr int64_t kAhead = 256;

inline void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
// The same for a row about to be written (prefetchw: the line arrives owned).
inline void PrefetchW(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_ET0); }

inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff)
                    : static_cast<__mmask16>((1u << left) - 1u);
}

inline __m512 LoadBf16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// RNE with integer ops for CPUs without vcvtneps2bf16 (same result as ToBf16One).
inline __m256i PackBf16Int(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, nan));
}

template <bool kHw>
inline __m256i PackBf16(__m512 v) {
  if constexpr (kHw) {
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  } else {
    return PackBf16Int(v);
  }
}

template <bool kHw>
void RowToBf16Avx512(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t c = 0; c < n; c += 16) {
    Prefetch(src + c + kAhead);
    PrefetchW(dst + c + kAhead);
    const __mmask16 m = TailMask(n - c);
    _mm256_mask_storeu_epi16(dst + c, m, PackBf16<kHw>(_mm512_maskz_loadu_ps(m, src + c)));
  }
}

void RowFromBf16Avx512(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; c += 16) {
    Prefetch(src + c + kAhead);
    PrefetchW(dst + c + kAhead);
    const __mmask16 m = TailMask(n - c);
    _mm512_mask_storeu_ps(dst + c, m, LoadBf16(src + c, m));
  }
}

void RowCopyF32Avx512(const float* src, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; c += 16) {
    Prefetch(src + c + kAhead);
    PrefetchW(dst + c + kAhead);
    const __mmask16 m = TailMask(n - c);
    _mm512_mask_storeu_ps(dst + c, m, _mm512_maskz_loadu_ps(m, src + c));
  }
}

template <bool kHw, bool kPartsBf16>
void SumRowsAvx512(const RowSum& s, int64_t n, float* out_f32, uint16_t* out_bf16) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = TailMask(n - c);
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < s.num_y; ++i) Prefetch(s.y[i] + c + kAhead);
    for (int j = 0; j < s.num_parts; ++j)
      Prefetch(static_cast<const char*>(s.parts[j]) + (c + kAhead) * (kPartsBf16 ? 2 : 4));
    if (out_bf16 != nullptr) {
      PrefetchW(out_bf16 + c + kAhead);
    } else {
      PrefetchW(out_f32 + c + kAhead);
    }
    for (int i = 0; i < s.num_y; ++i)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(s.w[i]), _mm512_maskz_loadu_ps(m, s.y[i] + c), acc);
    for (int j = 0; j < s.num_parts; ++j) {
      if constexpr (kPartsBf16) {
        acc = _mm512_add_ps(acc, LoadBf16(static_cast<const uint16_t*>(s.parts[j]) + c, m));
      } else {
        acc = _mm512_add_ps(acc,
                            _mm512_maskz_loadu_ps(m, static_cast<const float*>(s.parts[j]) + c));
      }
    }
    if (out_bf16 != nullptr) {
      _mm256_mask_storeu_epi16(out_bf16 + c, m, PackBf16<kHw>(acc));
    } else {
      _mm512_mask_storeu_ps(out_f32 + c, m, acc);
    }
  }
}

}  // namespace
}  // namespace sy::kernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace sy::kernels::cpu {
namespace {

std::atomic<int> test_level{-1};

CpuLevel Level() {
  static const CpuLevel detected = DetectCpuLevel();
  const int forced = test_level.load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<CpuLevel>(forced) : detected;
}

}  // namespace

void RowToBf16(const float* src, int64_t n, uint16_t* dst) {
  switch (Level()) {
    case CpuLevel::kAmx:
    case CpuLevel::kAvx512Bf16: return RowToBf16Avx512<true>(src, n, dst);
    case CpuLevel::kAvx512: return RowToBf16Avx512<false>(src, n, dst);
    case CpuLevel::kPortable: return RowToBf16Portable(src, n, dst);
  }
}

void RowFromBf16(const uint16_t* src, int64_t n, float* dst) {
  if (Level() == CpuLevel::kPortable) return RowFromBf16Portable(src, n, dst);
  RowFromBf16Avx512(src, n, dst);
}

void RowCopyF32(const float* src, int64_t n, float* dst) {
  if (Level() == CpuLevel::kPortable) return static_cast<void>(std::memcpy(dst, src, n * 4));
  RowCopyF32Avx512(src, n, dst);
}

void SumRows(const RowSum& sum, int64_t n, float* out_f32, uint16_t* out_bf16) {
  switch (Level()) {
    case CpuLevel::kAmx:
    case CpuLevel::kAvx512Bf16:
      return sum.parts_bf16 ? SumRowsAvx512<true, true>(sum, n, out_f32, out_bf16)
                            : SumRowsAvx512<true, false>(sum, n, out_f32, out_bf16);
    case CpuLevel::kAvx512:
      return sum.parts_bf16 ? SumRowsAvx512<false, true>(sum, n, out_f32, out_bf16)
                            : SumRowsAvx512<false, false>(sum, n, out_f32, out_bf16);
    case CpuLevel::kPortable:
      return sum.parts_bf16 ? SumRowsPortable<true>(sum, n, out_f32, out_bf16)
                            : SumRowsPortable<false>(sum, n, out_f32, out_bf16);
  }
}


void OverrideRowKernelsLevel(int level) {
  SY_CHECK_LE(level, static_cast<int>(DetectCpuLevel()));
  test_level.store(level, std::memory_order_relaxed);
}

}  // namespace sy::kernels::cpu
