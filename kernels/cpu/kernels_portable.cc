// Portable kernels of the fast CPU backend (any CPU; see cpu_kernels.h) and the CPU check.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/cpu/cpu_kernels.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sy::kernels::cpu {
namespace {

#if defined(__x86_64__)
// CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
bool CpuHasAmxBf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d & (1u << 22)) != 0 && (d & (1u << 24)) != 0;
}

// Linux hands out the 8 KiB AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM
// for XFEATURE_XTILEDATA, kernel 5.16+); the grant covers every thread of the process.
bool RequestAmxState() {
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtileData = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
}
#endif

}  // namespace

CpuLevel DetectCpuLevel() {
  static const CpuLevel level = [] {
    CpuLevel l = CpuLevel::kPortable;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512) l = CpuLevel::kAvx512;
    if (avx512 && __builtin_cpu_supports("avx512bf16")) l = CpuLevel::kAvx512Bf16;
    if (l == CpuLevel::kAvx512Bf16 && CpuHasAmxBf16() && RequestAmxState()) l = CpuLevel::kAmx;
#endif
    if (const char* env = std::getenv("SWITCHYARD_CPU_LEVEL")) {
      const std::string want(env);
      CpuLevel cap = l;
      if (want == "portable") cap = CpuLevel::kPortable;
      if (want == "avx512") cap = CpuLevel::kAvx512;
      if (want == "avx512bf16") cap = CpuLevel::kAvx512Bf16;
      l = std::min(l, cap);
    }
    return l;
  }();
  return level;
}

const char* CpuLevelName(CpuLevel level) {
  switch (level) {
    case CpuLevel::kPortable: return "portable";
    case CpuLevel::kAvx512: return "avx512";
    case CpuLevel::kAvx512Bf16: return "avx512bf16";
    case CpuLevel::kAmx: return "amx";
  }
  return "?";
}

namespace {

template <typename Load>
void DotRowsWith(const float* x, int64_t ldx, int64_t T, int64_t k, int64_t nrows, float* y,
                 int64_t ldy, const float* bias, Load load_row) {
  float wrow[256];
  for (int64_t j = 0; j < nrows; ++j) {
    for (int64_t t = 0; t < T; ++t) y[t * ldy + j] = bias ? bias[j] : 0.f;
    for (int64_t k0 = 0; k0 < k; k0 += 256) {
      const int64_t kn = std::min<int64_t>(256, k - k0);
      load_row(j, k0, kn, wrow);
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * ldx + k0;
        float acc[8] = {};
        int64_t i = 0;
        for (; i + 8 <= kn; i += 8)
          for (int l = 0; l < 8; ++l) acc[l] += xt[i + l] * wrow[i + l];
        for (; i < kn; ++i) acc[0] += xt[i] * wrow[i];
        float s = 0;
        for (float a : acc) s += a;
        y[t * ldy + j] += s;
      }
    }
  }
}

}  // namespace

void DotRowsPortable(const float* x, int64_t ldx, int64_t T, const void* w, DType wdt,
                     int64_t ldw, int64_t k, int64_t nrows, float* y, int64_t ldy,
                     const float* bias) {
  const uint8_t* base = static_cast<const uint8_t*>(w);
  const int64_t es = DTypeSize(wdt);
  DotRowsWith(x, ldx, T, k, nrows, y, ldy, bias,
              [&](int64_t j, int64_t k0, int64_t kn, float* out) {
                ConvertToF32(wdt, base + (j * ldw + k0) * es, kn, out);
              });
}

void SiluMulPortable(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

void RmsNormPortable(const float* x, int64_t rows, int64_t dim, const float* w, float eps,
                     float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = xr[i] * inv * w[i];
  }
}

void AttendOnePortable(const float* q, const float* const* k_rows, const float* const* v_rows,
                       int64_t len, int64_t head_dim, float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < len; ++p) {
    float s = 0;
    for (int64_t d = 0; d < head_dim; ++d) s += q[d] * k_rows[p][d];
    scores[p] = s * scale;
    mx = std::max(mx, scores[p]);
  }
  float sum = 0;
  for (int64_t p = 0; p < len; ++p) sum += (scores[p] = std::exp(scores[p] - mx));
  for (int64_t d = 0; d < head_dim; ++d) out[d] = 0;
  for (int64_t p = 0; p < len; ++p) {
    const float wgt = scores[p] / sum;
    for (int64_t d = 0; d < head_dim; ++d) out[d] += wgt * v_rows[p][d];
  }
}

}  // namespace sy::kernels::cpu
