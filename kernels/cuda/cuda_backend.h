// The "cuda" Backend (MakeBackend("cuda") / "cuda:K"): the model's weights, products, KV
// cache and attention on one GPU.
//
// What runs where: MatMul (q/k/v/o projections, router, shared expert, LM head) and the
// grouped expert FFN run on device K with cuBLAS (GemmContext, bf16 inputs, f32 accumulate)
// and this folder's SiLU kernel; every weight is copied to the device once, as bf16 (f32 and
// f16 checkpoints are converted while they are uploaded), the first time a product reads it,
// and stays there. Each layer's paged KV cache (a PagedKv that states num_blocks, as
// KvCache's do) lives on the device in f32: WriteKv scatters the new rows there
// (WritePagedKv) and attention runs PagedDecodeAttention with one query per new token (a
// prefill chunk's tokens see growing context lengths). Activations cross to the device and
// back per call; norms, RoPE, the router's top-k and the residual adds stay on the CPU (the
// fast CPU backend). Numerics: as the CPU backend at its AMX level for bf16 weights
// (activations rounded to bf16 for the products, f32 accumulation, f32 attention); f32
// checkpoints are read in bf16.
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
