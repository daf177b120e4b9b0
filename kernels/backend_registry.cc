// MakeBackend: the one place that knows every backend (library sy_backends, which links the
// CUDA backend when the build has CUDA).
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kernels/backend.h"
#include "kernels/cpu/fast_backend.h"
#ifdef SY_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace sy::kernels {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name) {
  if (name == "reference") return MakeReferenceBackend();
  if (name == "auto" || name == "cpu") return MakeFastCpuBackend();
  absl::string_view device = name;
  if (absl::ConsumePrefix(&device, "cuda")) {
    int index = 0;
    if (!device.empty() && (!absl::ConsumePrefix(&device, ":") ||
                            !absl::SimpleAtoi(device, &index) || index < 0))
      return absl::InvalidArgumentError(
          absl::StrCat("backend '", name, "': expected cuda or cuda:K (K a device index)"));
#ifdef SY_HAVE_CUDA
    return cuda::MakeCudaBackend(index);
#else
    return absl::FailedPreconditionError(absl::StrCat(
        "backend '", name, "': this build has no CUDA (nvcc was not found when it was "
        "configured, or -DSY_ENABLE_CUDA=OFF)"));
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", name, "' (known: auto, cpu, reference, cuda[:K])"));
}

}  // namespace sy::kernels
