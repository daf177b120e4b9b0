// CudaStatus: the one place a cudaError_t becomes an absl::Status.
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_kernels.h"

namespace sy::kernels::cuda {

absl::Status CudaStatus(cudaError_t err, const char* context) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(context, ": ", cudaGetErrorName(err), ": ",
                                          cudaGetErrorString(err)));
}

}  // namespace sy::kernels::cuda
