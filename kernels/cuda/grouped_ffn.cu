// Grouped expert FFN (phase 4 of kernels/cuda/cuda_kernels.h): GemmContext (cuBLAS loaded at
// run time, or a built-in tensor-core GEMM), the fused SiLU·mul, and the per-expert driver.
//
// Why dlopen: libcublasLt is half a gigabyte and GPU hosts do not always carry it; loading
// cuBLAS at run time lets one binary use it where present and still run (on the built-in GEMM)
// where it is not.
#include <cublas_api.h>
#include <dlfcn.h>
#include <mma.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_util.cuh"

namespace sy::kernels::cuda {
namespace {

// ---- cuBLAS, resolved at run time ---------------------------------------------------------------

struct CublasApi {
  cublasStatus_t (*create)(cublasHandle_t*) = nullptr;
  cublasStatus_t (*destroy)(cublasHandle_t) = nullptr;
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t) = nullptr;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
  const char* (*status_string)(cublasStatus_t) = nullptr;
  std::string error;  // why loading failed; empty when every symbol resolved
};

const CublasApi& Cublas() {
  static CublasApi* api = [] {
    auto* a = new CublasApi;
    // The loader's search path first (LD_LIBRARY_PATH, ldconfig), then the toolkit's usual
    // homes, since CUDA installs often leave lib64 out of the loader's configuration.
    std::vector<std::string> names = {"libcublas.so.13"};
    if (const char* home = std::getenv("CUDA_HOME")) names.push_back(absl::StrCat(home, "/lib64/libcublas.so.13"));
    names.push_back("/usr/local/cuda/lib64/libcublas.so.13");
    names.push_back("/usr/local/cuda-13/lib64/libcublas.so.13");
    void* lib = nullptr;
    std::string first_error;
    for (const std::string& name : names) {
      lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib) break;
      const char* e = dlerror();
      if (first_error.empty()) first_error = e ? e : "unknown error";
    }
    if (!lib) {
      a->error = absl::StrCat("cannot load cuBLAS (", first_error, ")");
      return a;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (!fn && a->error.empty()) a->error = absl::StrCat("libcublas has no symbol ", name);
    };
    sym(a->create, "cublasCreate_v2");
    sym(a->destroy, "cublasDestroy_v2");
    sym(a->set_stream, "cublasSetStream_v2");
    sym(a->gemm_ex, "cublasGemmEx");
    sym(a->status_string, "cublasGetStatusString");
    return a;
  }();
  return *api;
}

absl::Status CublasStatus(cublasStatus_t s, const char* context) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const CublasApi& api = Cublas();
  return absl::InternalError(absl::StrCat(context, ": cuBLAS status ", static_cast<int>(s), " ",
                                          api.status_string ? api.status_string(s) : ""));
}

// ---- built-in GEMM: y[M, N] = x[M, K] · w[N, K]^T, bf16 in, f32 accumulate --------------------
//
// 64×64 output tile per block of 4 warps (2×2, each 32×32 = 2×2 WMMA 16×16×16 fragments),
// K in steps of 32 through shared memory. Rows are padded to 40 elements (80 bytes) to spread
// shared-memory banks while keeping WMMA's 32-byte pointer alignment. Edges are zero-filled,
// so any M, N, K work; 16-byte loads when K % 8 == 0 and the bases are 16-byte aligned.

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kLds = kTileK + 8, kLdc = 36;
constexpr int kGemmThreads = 128;

template <bool kVec>
__device__ __forceinline__ void LoadTile(const __nv_bfloat16* __restrict__ src, int64_t rows,
                                         int64_t k, int64_t row0, int64_t k0, __nv_bfloat16* dst) {
  // kTileM (== kTileN) rows × kTileK columns = 256 chunks of 8 elements, 2 per thread.
#pragma unroll
  for (int c = threadIdx.x; c < kTileM * kTileK / 8; c += kGemmThreads) {
    const int r = c / (kTileK / 8), kc = (c % (kTileK / 8)) * 8;
    const int64_t gr = row0 + r, gk = k0 + kc;
    __nv_bfloat16* d = dst + r * kLds + kc;
    if (kVec && gr < rows && gk + 8 <= k) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(src + gr * k + gk);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        d[e] = (gr < rows && gk + e < k) ? src[gr * k + gk + e] : __float2bfloat16_rn(0.f);
    }
  }
}

template <typename TY, bool kVec>
__global__ void __launch_bounds__(kGemmThreads)
    GemmBf16Kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                   int64_t m, int64_t n, int64_t k, TY* __restrict__ y) {
  using namespace nvcuda;
  __shared__ __align__(128) __nv_bfloat16 xs[kTileM * kLds];
  __shared__ __align__(128) __nv_bfloat16 ws[kTileN * kLds];
  __shared__ __align__(128) float cs[4][32 * kLdc];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    LoadTile<kVec>(x, m, k, m0, k0, xs);
    LoadTile<kVec>(w, n, k, n0, k0, ws);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wm * 32 + i * 16) * kLds + kk, kLds);
      // B(k, n) = w[n, k]: the w tile stored [n][k] is B in column-major order.
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ws + (wn * 32 + j * 16) * kLds + kk, kLds);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  float* c = cs[warp];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c + i * 16 * kLdc + j * 16, acc[i][j], kLdc, wmma::mem_row_major);
  __syncwarp();
  for (int idx = lane; idx < 32 * 32; idx += 32) {
    const int r = idx / 32, col = idx % 32;
    const int64_t gm = m0 + wm * 32 + r, gn = n0 + wn * 32 + col;
    if (gm < m && gn < n) internal::Store(y, gm * n + gn, c[r * kLdc + col]);
  }
}

// Skinny GEMM for decode-sized M (<= kSkinnyMaxM): one warp per output column streams its
// weight row once with 16-byte loads and dots it with up to kSkinnyRows rows of x (L1/L2
// resident); a block holds kSkinnyWarps columns. The 64×64 tile kernel would launch only
// N/64 blocks here (16 for the down projection) and leave most SMs idle while the whole
// cost is reading W. Needs K % 8 == 0 and 16-byte aligned x and w.
constexpr int kSkinnyRows = 8, kSkinnyWarps = 8, kSkinnyMaxM = 32;

template <typename TY>
__global__ void __launch_bounds__(kSkinnyWarps * 32)
    GemmSkinnyKernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                     int64_t m, int64_t n, int64_t k, TY* __restrict__ y) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSkinnyWarps + warp;
  if (col >= n) return;  // whole warp; no block-wide synchronisation follows
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSkinnyRows;
  const int rows = static_cast<int>(m - m0 < kSkinnyRows ? m - m0 : kSkinnyRows);
  const __nv_bfloat16* wr = w + col * k;
  float acc[kSkinnyRows];
#pragma unroll
  for (int r = 0; r < kSkinnyRows; ++r) acc[r] = 0.f;
  for (int64_t k0 = static_cast<int64_t>(lane) * 8; k0 < k; k0 += 32 * 8) {
    const uint4 wv = *reinterpret_cast<const uint4*>(wr + k0);
    const __nv_bfloat16* we = reinterpret_cast<const __nv_bfloat16*>(&wv);
    float wf[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) wf[e] = __bfloat162float(we[e]);
#pragma unroll
    for (int r = 0; r < kSkinnyRows; ++r) {
      if (r < rows) {
        const uint4 xv = *reinterpret_cast<const uint4*>(x + (m0 + r) * k + k0);
        const __nv_bfloat16* xe = reinterpret_cast<const __nv_bfloat16*>(&xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r] += wf[e] * __bfloat162float(xe[e]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kSkinnyRows; ++r) {
    const float v = internal::WarpSum(acc[r]);
    if (lane == 0 && r < rows) internal::Store(y, (m0 + r) * n + col, v);
  }
}

__global__ void SiluMulKernel(const float* __restrict__ gate, const float* __restrict__ up,
                              int64_t count, __nv_bfloat16* __restrict__ act) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    act[i] = __float2bfloat16_rn(g / (1.f + expf(-g)) * up[i]);
  }
}

int64_t Align256(int64_t b) { return (b + 255) / 256 * 256; }

}  // namespace

// ---- GemmContext ------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<GemmContext>> GemmContext::Create(GemmBackend backend) {
  std::unique_ptr<GemmContext> ctx(new GemmContext);
  if (backend == GemmBackend::kBuiltin) return ctx;
  const CublasApi& api = Cublas();
  if (!api.error.empty()) {
    if (backend == GemmBackend::kCublas) return absl::NotFoundError(api.error);
    return ctx;  // kAuto: fall back to the built-in GEMM
  }
  cublasHandle_t h = nullptr;
  absl::Status created = CublasStatus(api.create(&h), "cublasCreate");
  if (!created.ok()) {
    if (backend == GemmBackend::kCublas) return created;
    return ctx;
  }
  ctx->cublas_handle_ = h;
  ctx->backend_ = GemmBackend::kCublas;
  return ctx;
}

GemmContext::~GemmContext() {
  if (cublas_handle_) Cublas().destroy(static_cast<cublasHandle_t>(cublas_handle_));
}

absl::Status GemmContext::Gemm(const void* x, const void* w, int64_t m, int64_t n, int64_t k,
                               void* y, DType y_dtype, cudaStream_t stream) {
  if (auto s = internal::CheckActDType(y_dtype, "Gemm y"); !s.ok()) return s;
  if (m < 0 || n <= 0 || k <= 0 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX ||
      (m + kTileM - 1) / kTileM > 65535)
    return absl::InvalidArgumentError(absl::StrCat("Gemm: bad shape m=", m, " n=", n, " k=", k));
  if (m == 0) return absl::OkStatus();
  if (backend_ == GemmBackend::kCublas) {
    const CublasApi& api = Cublas();
    auto h = static_cast<cublasHandle_t>(cublas_handle_);
    if (auto s = CublasStatus(api.set_stream(h, stream), "cublasSetStream"); !s.ok()) return s;
    const float alpha = 1.f, beta = 0.f;
    // Row-major y[M, N] is column-major y^T [N, M]: y^T = w · x^T, with w row-major [N, K]
    // read as column-major [K, N] and transposed.
    return CublasStatus(
        api.gemm_ex(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                    static_cast<int>(k), &alpha, w, CUDA_R_16BF, static_cast<int>(k), x,
                    CUDA_R_16BF, static_cast<int>(k), &beta, y,
                    y_dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF, static_cast<int>(n),
                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
  }
  const dim3 grid(static_cast<unsigned>((n + kTileN - 1) / kTileN),
                  static_cast<unsigned>((m + kTileM - 1) / kTileM));
  const bool vec = k % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(w) & 15) == 0;
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  const auto* wb = static_cast<const __nv_bfloat16*>(w);
  const bool skinny = vec && m <= kSkinnyMaxM && (n + kSkinnyWarps - 1) / kSkinnyWarps <= INT32_MAX;
  const dim3 skinny_grid(static_cast<unsigned>((n + kSkinnyWarps - 1) / kSkinnyWarps),
                         static_cast<unsigned>((m + kSkinnyRows - 1) / kSkinnyRows));
  internal::Dispatch(y_dtype, [&](auto* tag) {
    using TY = std::remove_pointer_t<decltype(tag)>;
    if (skinny) {
      GemmSkinnyKernel<TY><<<skinny_grid, kSkinnyWarps * 32, 0, stream>>>(xb, wb, m, n, k, static_cast<TY*>(y));
    } else if (vec) {
      GemmBf16Kernel<TY, true><<<grid, kGemmThreads, 0, stream>>>(xb, wb, m, n, k, static_cast<TY*>(y));
    } else {
      GemmBf16Kernel<TY, false><<<grid, kGemmThreads, 0, stream>>>(xb, wb, m, n, k, static_cast<TY*>(y));
    }
  });
  return internal::LaunchStatus(skinny ? "GemmSkinnyKernel" : "GemmBf16Kernel");
}

// ---- SiLU·mul and the grouped FFN ---------------------------------------------------------------

absl::Status SiluMul(const float* gate, const float* up, int64_t num_rows, int64_t inter,
                     void* act, cudaStream_t stream) {
  if (num_rows < 0 || inter <= 0)
    return absl::InvalidArgumentError(absl::StrCat("SiluMul: bad shape [", num_rows, ", ", inter, "]"));
  const int64_t count = num_rows * inter;
  if (count == 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 65536);
  SiluMulKernel<<<blocks, 256, 0, stream>>>(gate, up, count, static_cast<__nv_bfloat16*>(act));
  return internal::LaunchStatus("SiluMulKernel");
}

int64_t GroupedExpertFfnWorkspaceBytes(int64_t num_rows, int64_t inter) {
  const int64_t f32 = Align256(num_rows * inter * 4);
  return 2 * f32 + Align256(num_rows * inter * 2);
}

absl::Status GroupedExpertFfn(GemmContext& gemm, const ExpertFfnWeights* experts,
                              int64_t num_experts, const int32_t* offsets_host, int64_t hidden,
                              int64_t inter, const void* x, void* y, void* workspace,
                              int64_t workspace_bytes, cudaStream_t stream) {
  if (num_experts < 1 || hidden <= 0 || inter <= 0 || offsets_host == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("GroupedExpertFfn: bad sizes experts=", num_experts,
                                                   " hidden=", hidden, " inter=", inter));
  if (offsets_host[0] != 0) return absl::InvalidArgumentError("GroupedExpertFfn: offsets[0] must be 0");
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = offsets_host[e + 1] - offsets_host[e];
    if (rows < 0)
      return absl::InvalidArgumentError(absl::StrCat("GroupedExpertFfn: offsets decrease at expert ", e));
    if (rows > 0 && (!experts[e].w1 || !experts[e].w2 || !experts[e].w3))
      return absl::InvalidArgumentError(absl::StrCat("GroupedExpertFfn: expert ", e, " has ", rows,
                                                     " rows but null weights"));
  }
  const int64_t total = offsets_host[num_experts];
  if (total == 0) return absl::OkStatus();
  if (workspace_bytes < GroupedExpertFfnWorkspaceBytes(total, inter))
    return absl::InvalidArgumentError(absl::StrCat("GroupedExpertFfn: workspace of ", workspace_bytes,
                                                   " bytes, need ",
                                                   GroupedExpertFfnWorkspaceBytes(total, inter)));
  auto* base = static_cast<char*>(workspace);
  auto* gate = reinterpret_cast<float*>(base);
  auto* up = reinterpret_cast<float*>(base + Align256(total * inter * 4));
  auto* act = reinterpret_cast<__nv_bfloat16*>(base + 2 * Align256(total * inter * 4));
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  auto* yb = static_cast<__nv_bfloat16*>(y);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t r0 = offsets_host[e], rows = offsets_host[e + 1] - r0;
    if (rows == 0) continue;
    if (auto s = gemm.Gemm(xb + r0 * hidden, experts[e].w1, rows, inter, hidden, gate + r0 * inter,
                           DType::kF32, stream);
        !s.ok())
      return absl::Status(s.code(), absl::StrCat("expert ", e, " w1: ", s.message()));
    if (auto s = gemm.Gemm(xb + r0 * hidden, experts[e].w3, rows, inter, hidden, up + r0 * inter,
                           DType::kF32, stream);
        !s.ok())
      return absl::Status(s.code(), absl::StrCat("expert ", e, " w3: ", s.message()));
  }
  if (auto s = SiluMul(gate, up, total, inter, act, stream); !s.ok()) return s;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t r0 = offsets_host[e], rows = offsets_host[e + 1] - r0;
    if (rows == 0) continue;
    if (auto s = gemm.Gemm(act + r0 * inter, experts[e].w2, rows, hidden, inter, yb + r0 * hidden,
                           DType::kBF16, stream);
        !s.ok())
      return absl::Status(s.code(), absl::StrCat("expert ", e, " w2: ", s.message()));
  }
  return absl::OkStatus();
}

}  // namespace sy::kernels::cuda
