// The fast CPU backend ("cpu"): AVX-512-BF16 / AVX-512 kernels (kernels/cpu/cpu_kernels.h)
// behind the Backend seam, parallelised on ThreadPool::Default() (one pool, no nested
// parallel regions).
//
// Created by MakeBackend("cpu") / MakeBackend("auto") (kernels/backend_registry.cc); the
// tests build one per CPU level to check every path against the reference backend.
//
// Thread safety: as Backend — one caller thread at a time (it owns grow-only scratch space).
#pragma once

#include <memory>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_kernels.h"

namespace sy::kernels {

// The fast backend at the best level this CPU supports (DetectCpuLevel()).
std::unique_ptr<Backend> MakeFastCpuBackend();
// At a given level; SY_CHECK-fails when the CPU lacks it (tests skip such levels).
std::unique_ptr<Backend> MakeFastCpuBackend(cpu::CpuLevel level);

}  // namespace sy::kernels
