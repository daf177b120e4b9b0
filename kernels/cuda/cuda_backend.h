// The "cuda" Backend (MakeBackend("cuda") / "cuda:K"): the model's weight products on one GPU.
//
// What runs where: MatMul (q/k/v/o projections, router, shared expert, LM head) and the
// grouped expert FFN run on device K with cuBLAS (GemmContext, bf16 inputs, f32 accumulate)
// and this folder's SiLU kernel; every weight is copied to the device once, as bf16 (f32 and
// f16 checkpoints are converted while they are uploaded), the first time a product reads it,
// and stays there. Activations cross to the device in bf16 and results come back per call.
// Norms, RoPE, the paged KV cache and attention stay on the CPU (the fast CPU backend): this
// is the first stage of the GPU path, the one that moves the weight traffic, which is what a
// decode step is made of. Numerics: as the CPU backend at its AMX level for bf16 weights
// (activations rounded to bf16, f32 accumulation); f32 checkpoints are read in bf16.
//
// Errors: FAILED_PRECONDITION at creation when the host has no usable CUDA device or driver,
// or the device is older than sm_90 (the kernels are built for H100 / H200); INVALID_ARGUMENT
// for a device index past the host's devices; RESOURCE_EXHAUSTED when a weight does not fit
// in device memory, naming its shape, its bytes and the device's free memory.
//
// Thread safety: one thread at a time (the model's engine thread), as every Backend.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace sy::kernels::cuda {

// OK when device `device` can run this build's kernels; else the error MakeCudaBackend gives.
absl::Status ProbeCudaDevice(int device);

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device);

}  // namespace sy::kernels::cuda
