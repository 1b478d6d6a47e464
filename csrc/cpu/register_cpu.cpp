// Registers the CPU kernels (spmm_cpu.h) as the CPU implementations of the csr_* and bsr_* ops
// declared in csrc/ops.cpp, through the wrappers shared with the CUDA kernels (format_wrappers.h).
// masked_* has no CPU kernel: the reference, a dense matmul, serves it.
#include <torch/library.h>

#include "../format_wrappers.h"
#include "spmm_cpu.h"

TORCH_LIBRARY_IMPL(sparseode, CPU, m) {
  using namespace sparseode::cpu;
  sparseode::FormatWrappers<&bsr_spmm, &bsr_spmm_fm, &bsr_spmm_t, &bsr_sddmm>::register_all(m);
}
