#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/fast_backend.h"

namespace sy::kernels {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name) {
  if (name == "reference") return MakeReferenceBackend();
  if (name == "auto" || name == "cpu") return MakeFastCpuBackend();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", name, "' (known: auto, cpu, reference)"));
}

}  // namespace sy::kernels
