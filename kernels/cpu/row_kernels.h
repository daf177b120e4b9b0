// Row kernels of the expert-parallel dispatcher (parallel/ep_dispatch.cc), over raw pointers:
// packing token rows into the wire dtype, widening them back, and the fused weighted sums of
// the pre-sum and combine steps. Each kernel makes one pass over its rows (read every input once, write the output
// once), so the dispatcher's memory traffic stays at the minimum its layout needs.
//
// The AVX-512 kernels prefetch (and prefetchw their output) a fixed distance ahead in every
// row: the dispatcher's rows are scattered 4 KiB pieces and hardware prefetchers stop at page
// boundaries.
//
// Two flavours, picked once at run time: AVX-512 (f32 → bf16 with vcvtneps2bf16 when the CPU
// has AVX-512-BF16, which flushes bf16 denormal inputs to zero; else the RNE bit trick in
// 16-lane registers) and portable C++ (RNE, NaN stays NaN). Both round to nearest even.
//
// Thread safety: pure functions over caller-owned memory.
#pragma once

#include <cstdint>

namespace sy::kernels::cpu {

// dst: bf16 [n] = RNE(src: f32 [n]).
void RowToBf16(const float* src, int64_t n, uint16_t* dst);
// dst: f32 [n] = src: bf16 [n] (exact).
void RowFromBf16(const uint16_t* src, int64_t n, float* dst);
// dst: f32 [n] = src: f32 [n] (memcpy, with the prefetch of the other kernels).
void RowCopyF32(const float* src, int64_t n, float* dst);

// One fused weighted sum over `n` columns:
//   acc[c] = Σ_i w[i] · y[i][c]  +  Σ_j parts[j][c]
// y: num_y f32 rows (weights w: f32 [num_y]); parts: num_parts rows in bf16 (parts_bf16) or
// f32. The result goes to exactly one of out_f32 (f32 [n]) or out_bf16 (bf16 [n], RNE).
// num_y + num_parts == 0 writes zeros. out_f32 may be one of the y rows (an in-place add):
// each column block is read before it is written.
struct RowSum {
  const float* const* y = nullptr;
  const float* w = nullptr;
  int num_y = 0;
  const void* const* parts = nullptr;
  int num_parts = 0;
  bool parts_bf16 = false;
};
void SumRows(const RowSum& sum, int64_t n, float* out_f32, uint16_t* out_bf16);

// Makes the kernels above use `level` (0 portable, 1 AVX-512, 2 AVX-512-BF16, as
// CpuLevel) from now on, or the detected level again for -1, so that every path
// can be checked on one machine. A level above the detected one is a bug.
void OverrideRowKernelsLevel(int level);

}  // namespace sy::kernels::cpu
