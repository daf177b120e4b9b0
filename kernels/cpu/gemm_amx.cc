// AMX-BF16 kernels of the fast CPU backend (see cpu_kernels.h, level kAmx).
//
// One tile multiply (TDPBF16PS) computes C[16 x 16] += A[16 x 32] . B[32 x 16] with bf16 inputs
// and f32 accumulation. The weight rows (row-major [N, K] as the checkpoint stores them) are
// the A operand: a tile is 16 consecutive weight rows x 32 columns, loaded straight from the
// checkpoint with the row stride, so weights are never repacked. The activations are the B
// operand, which AMX wants in "VNNI" order (row r of the tile holds, for 16 tokens, the pair
// of elements 2r and 2r+1); PackBf16ForAmx builds that once per call from the bf16 rows the
// backend converts anyway. The product is therefore y^T; each finished 16 x 16 tile is
// transposed in registers on its way to y.
//
// Compiled with a per-function target (amx-tile, amx-bf16 and AVX-512), like gemm_avx512.cc;
// called only when DetectCpuLevel() returned kAmx, which also asked Linux for the AMX state.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/core/logging.h"

#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#endif

namespace sy::kernels::cpu {
namespace {

// The tile configuration (palette 1): every tile used is 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: accumulators C[n block][m block]; 4, 5: weight rows (A); 6, 7: tokens (B).
void ConfigureTiles() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = 64;
    c.rows[i] = 16;
  }
  _tile_loadconfig(&c);
}

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] = row i).
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane j: column 4j + c of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // Row 4j + c of the result: lane j of u[c], u[4 + c], u[8 + c], u[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// c: C^T tile [16 weight rows][16 tokens] (f32, 64-byte rows). Writes y[m][n0 + n] for the
// first `mt` tokens (+ bias[n]).
inline void StoreTransposed(const float* c, int64_t mt, float* y, int64_t ldy, const float* bias) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 16 * i);
  Transpose16x16(r);
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int64_t m = 0; m < mt; ++m)
    _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(_mm512_castsi512_ps(r[m]), b));
}

// One block of up to 32 weight rows x 32 tokens over the whole K. kTwoN: a second 16-row
// weight tile; kTwoM: a second 16-token tile.
template <bool kTwoN, bool kTwoM>
inline void Block(const uint32_t* xp0, const uint32_t* xp1, const uint16_t* w, int64_t ldw,
                  int64_t k, int64_t m0_tokens, int64_t m1_tokens, float* y, int64_t ldy,
                  const float* bias) {
  alignas(64) float c[4][256];
  _tile_zero(0);
  if constexpr (kTwoM) _tile_zero(1);
  if constexpr (kTwoN) _tile_zero(2);
  if constexpr (kTwoN && kTwoM) _tile_zero(3);
  const uint16_t* w1 = w + 16 * ldw;
  const int64_t stride = ldw * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t kk = 0; kk < k; kk += 32) {
    _tile_loadd(4, w + kk, stride);
    _tile_loadd(6, xp0 + kk / 2 * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kTwoM) {
      _tile_loadd(7, xp1 + kk / 2 * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kTwoN) {
      _tile_loadd(5, w1 + kk, stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kTwoM) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c[0], 64);
  if constexpr (kTwoM) _tile_stored(1, c[1], 64);
  if constexpr (kTwoN) _tile_stored(2, c[2], 64);
  if constexpr (kTwoN && kTwoM) _tile_stored(3, c[3], 64);
  StoreTransposed(c[0], m0_tokens, y, ldy, bias);
  if constexpr (kTwoM) StoreTransposed(c[1], m1_tokens, y + 16 * ldy, ldy, bias);
  if constexpr (kTwoN) {
    const float* b1 = bias ? bias + 16 : nullptr;
    StoreTransposed(c[2], m0_tokens, y + 16, ldy, b1);
    if constexpr (kTwoM) StoreTransposed(c[3], m1_tokens, y + 16 * ldy + 16, ldy, b1);
  }
}

}  // namespace

void PackBf16ForAmx(const uint16_t* x, int64_t ldx, int64_t T, int64_t kp, uint32_t* dst) {
  SY_CHECK(kp % kAmxK == 0 && ldx >= kp) << "packing " << kp << " columns, ld " << ldx;
  const int64_t k2 = kp / 2;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const int64_t mt = std::min<int64_t>(16, T - t0);
    uint32_t* block = dst + t0 / 16 * k2 * 16;
    for (int64_t c0 = 0; c0 < k2; c0 += 16) {
      __m512i r[16];
      for (int64_t m = 0; m < 16; ++m)
        r[m] = m < mt ? _mm512_loadu_si512(x + (t0 + m) * ldx + 2 * c0) : zero;
      Transpose16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_si512(block + (c0 + i) * 16, r[i]);
    }
  }
}

void DotRowsBf16Amx(const uint32_t* xp, int64_t T, int64_t kp, const uint16_t* w, int64_t ldw,
                    int64_t k, int64_t nrows, float* y, int64_t ldy, const float* bias) {
  SY_CHECK(k % kAmxK == 0 && kp >= k && nrows % 16 == 0)
      << "AMX shape k " << k << " kp " << kp << " rows " << nrows;
  if (T <= 0 || nrows <= 0) return;
  ConfigureTiles();
  const int64_t mblocks = (T + 15) / 16;
  const int64_t block_u32 = kp / 2 * 16;  // one packed block of 16 tokens
  for (int64_t n0 = 0; n0 < nrows; n0 += 32) {
    const bool two_n = n0 + 32 <= nrows;
    const uint16_t* wn = w + n0 * ldw;
    const float* bn = bias ? bias + n0 : nullptr;
    for (int64_t mb = 0; mb < mblocks; mb += 2) {
      const bool two_m = mb + 1 < mblocks;
      const uint32_t* xp0 = xp + mb * block_u32;
      const int64_t m0 = std::min<int64_t>(16, T - mb * 16);
      const int64_t m1 = two_m ? std::min<int64_t>(16, T - mb * 16 - 16) : 0;
      float* yb = y + mb * 16 * ldy + n0;
      if (two_n && two_m) {
        Block<true, true>(xp0, xp0 + block_u32, wn, ldw, k, m0, m1, yb, ldy, bn);
      } else if (two_n) {
        Block<true, false>(xp0, nullptr, wn, ldw, k, m0, 0, yb, ldy, bn);
      } else if (two_m) {
        Block<false, true>(xp0, xp0 + block_u32, wn, ldw, k, m0, m1, yb, ldy, bn);
      } else {
        Block<false, false>(xp0, nullptr, wn, ldw, k, m0, 0, yb, ldy, bn);
      }
    }
  }
  _tile_release();
}

}  // namespace sy::kernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
