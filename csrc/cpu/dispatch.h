// Run-time choice of the CPU kernel variant, as ATen's CPU capability dispatch does.
//
// FOR THE OP LAYER (register_cpu.cpp, csrc/ops.cpp): nothing to call from the registrations. The
// at::Tensor entry points of spmm_cpu.h already go through active_kernels(); cpu_capability() is the
// one function to expose (capability_op.cpp registers it as torch.ops.sparseode.cpu_capability).
//
// A portable build (the default) holds three variants of the same kernels: "default" (baseline
// x86-64, SSE2), "avx2" (AVX2 + FMA) and "avx512" (AVX-512 F/BW/VL/DQ). The widest one the CPU
// supports is used, unless the environment variable SPARSEODE_CPU_CAPABILITY (default | avx2 |
// avx512, read once) asks for a narrower one; asking for one the CPU lacks warns and uses the widest
// it has. A SPARSEODE_NATIVE=1 build holds only "native" (-march=native of the build machine).
#pragma once

#include <string>

#include "kernel_table.h"

namespace sparseode::cpu {

// The kernels of the chosen variant. Throws (c10::Error) when SPARSEODE_CPU_CAPABILITY is not one of
// the names above.
const KernelTable& active_kernels();

// The name of the chosen variant: "default", "avx2", "avx512" or "native".
std::string cpu_capability();

}  // namespace sparseode::cpu
