// Building blocks of the fast CPU backend (kernels/cpu/fast_backend.cc): single-threaded
// kernels over a slice of work, in four flavours chosen at run time by CpuLevel():
//
//   * kAmx: as kAvx512Bf16, and calls with enough tokens multiply on the AMX tile unit
//     (gemm_amx.cc): weight rows are the A tiles, read row-major from the checkpoint; the
//     bf16 activations are packed once per call into AMX's pair-interleaved B layout;
//   * kAvx512Bf16: activations rounded to bf16 (RNE) once per call, weights read row-major
//     straight from the checkpoint, multiplied with vdpbf16ps (f32 accumulation);
//   * kAvx512: AVX-512F FMA in f32; bf16 / f16 weights widened to f32 on load;
//   * kPortable: plain C++ (any x86-64 or other CPU), f32 accumulation.
//
// The AVX-512 functions are compiled with per-function target attributes (gemm_avx512.cc),
// never with global -march flags, so the binary runs on CPUs without AVX-512; calling one
// on such a CPU is a bug (SY_CHECKed by the backend, which picks by CpuLevel()).
//
// "Dot rows" kernels compute, for t < T and j < nrows,
//     y[t * ldy + j] = sum_k x[t * ldx + k] * W[j * ldw + k]  (+ bias[j] if bias)
// with W row-major [nrows, K] in its dtype: a Linear's weight slice starting at its row n0,
// so one thread can own a contiguous range of output rows. Several tokens are multiplied
// against the same few weight rows at once (register tiles of up to 4 tokens x 4 rows), so a
// weight byte loaded from memory is reused across tokens.
//
// Thread safety: pure functions over caller-owned memory.
#pragma once

#include <cstdint>

#include "kernels/core/dtype.h"

namespace sy::kernels::cpu {

enum class CpuLevel { kPortable = 0, kAvx512 = 1, kAvx512Bf16 = 2, kAmx = 3 };

// What this CPU supports (checked once with __builtin_cpu_supports / CPUID; kAmx also needs
// Linux to grant the process the AMX tile state, asked for here). SWITCHYARD_CPU_LEVEL
// (portable, avx512, avx512bf16, amx) can lower it for tests and comparisons, never raise it.
CpuLevel DetectCpuLevel();
const char* CpuLevelName(CpuLevel level);

// Rows of bf16 activations are padded to a multiple of this many elements (zero-filled).
inline constexpr int64_t kBf16Pad = 32;
inline int64_t PaddedBf16Cols(int64_t k) { return (k + kBf16Pad - 1) / kBf16Pad * kBf16Pad; }

// ---- kAvx512Bf16 ------------------------------------------------------------------------
// dst[r * ld_dst + c] = bf16_rne(src[r * ld_src + c]) for c < k; zeros for k <= c < ld_dst.
// ld_dst must be PaddedBf16Cols(k).
void ConvertRowsToBf16Avx512(const float* src, int64_t rows, int64_t k, int64_t ld_src,
                             uint16_t* dst, int64_t ld_dst);
// x: bf16 [T, ldx] (padded rows as above), W: bf16 row-major.
void DotRowsBf16Avx512(const uint16_t* x, int64_t ldx, int64_t T, const uint16_t* w,
                       int64_t ldw, int64_t k, int64_t nrows, float* y, int64_t ldy,
                       const float* bias);

// ---- kAmx -------------------------------------------------------------------------------
// K granularity of the AMX kernels: one tile row is 32 bf16.
inline constexpr int64_t kAmxK = 32;
// u32 elements PackBf16ForAmx writes for T rows of kp (a multiple of kAmxK) columns.
inline int64_t AmxPackedSize(int64_t T, int64_t kp) { return (T + 15) / 16 * 16 * (kp / 2); }
// Packs bf16 rows x [T, ldx] (columns [0, kp) read; kp % kAmxK == 0, ldx >= kp) into blocks of
// 16 rows, each [kp / 2][16] pairs: dst[(t / 16) * 16 * kp/2 + c * 16 + t % 16] = the pair of
// columns 2c, 2c + 1 of row t; rows past T are zeros. dst 64-byte aligned.
void PackBf16ForAmx(const uint16_t* x, int64_t ldx, int64_t T, int64_t kp, uint32_t* dst);
// y[t * ldy + j] = sum_{c < k} x[t][c] * W[j * ldw + c] (+ bias[j]) for t < T, j < nrows, with
// x packed by PackBf16ForAmx (kp >= k columns) and W bf16 row-major. k % kAmxK == 0 and
// nrows % 16 == 0 (the caller runs the other rows with DotRowsBf16Avx512).
void DotRowsBf16Amx(const uint32_t* xp, int64_t T, int64_t kp, const uint16_t* w, int64_t ldw,
                    int64_t k, int64_t nrows, float* y, int64_t ldy, const float* bias);

// ---- kAvx512 (also used on kAvx512Bf16 machines for f32 / f16 weights) -------------------
// x: f32 [T, ldx]; W of dtype wdt (f32, bf16 or f16).
void DotRowsF32Avx512(const float* x, int64_t ldx, int64_t T, const void* w, DType wdt,
                      int64_t ldw, int64_t k, int64_t nrows, float* y, int64_t ldy,
                      const float* bias);
// out[i] = silu(g[i]) * u[i]; out as f32 or (bf16 != nullptr) as bf16 RNE.
void SiluMulAvx512(const float* g, const float* u, int64_t n, float* out_f32,
                   uint16_t* out_bf16);
// y[r] = x[r] / rms(x[r]) * w for rows r < rows; w f32 [dim]. x may equal y.
void RmsNormAvx512(const float* x, int64_t rows, int64_t dim, const float* w, float eps,
                   float* y);
// Attention of one query row against `len` keys: out[d] = sum_p softmax(scale * q.k_p) v_p.
// k_p = k_rows[p] (pointers into the paged cache), head_dim d. scores: scratch [len].
void AttendOneAvx512(const float* q, const float* const* k_rows, const float* const* v_rows,
                     int64_t len, int64_t head_dim, float scale, float* scores, float* out);

// ---- kPortable --------------------------------------------------------------------------
void DotRowsPortable(const float* x, int64_t ldx, int64_t T, const void* w, DType wdt,
                     int64_t ldw, int64_t k, int64_t nrows, float* y, int64_t ldy,
                     const float* bias);
void SiluMulPortable(const float* g, const float* u, int64_t n, float* out);
void RmsNormPortable(const float* x, int64_t rows, int64_t dim, const float* w, float eps,
                     float* y);
void AttendOnePortable(const float* q, const float* const* k_rows, const float* const* v_rows,
                       int64_t len, int64_t head_dim, float scale, float* scores, float* out);

}  // namespace sy::kernels::cpu
