// Helpers of the gpu-labelled tests (*_gpu_test.cc): whether a device is usable, and the skip
// that turns into a failure on a GPU host. Header-only: the GPU test binaries link only their
// folder's library and gtest (they are copied to GPU hosts without Debian packages).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace sy::testing {

// Empty when a device is usable, else why not (e.g. a driver older than the CUDA 13 runtime
// the binary carries statically).
inline std::string NoGpuReason() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
  return n > 0 ? "" : "no CUDA device";
}

}  // namespace sy::testing

// Skips without a device; with SY_REQUIRE_GPU=1 in the environment (set it on the GPU host so
// that a broken driver cannot pass as a skip) the test fails instead.
#define SKIP_WITHOUT_GPU()                                                           \
  do {                                                                               \
    const std::string why_ = ::sy::testing::NoGpuReason();                           \
    if (!why_.empty()) {                                                             \
      const char* req_ = std::getenv("SY_REQUIRE_GPU");                              \
      if (req_ && std::string(req_) == "1") FAIL() << why_ << " (SY_REQUIRE_GPU=1)"; \
      GTEST_SKIP() << why_;                                                          \
    }                                                                                \
  } while (0)
