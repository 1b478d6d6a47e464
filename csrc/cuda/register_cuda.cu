// Registers the CUDA kernels (spmm_cuda.h) as the CUDA implementations of the csr_* and bsr_* ops
// declared in csrc/ops.cpp, through the wrappers shared with the CPU kernels (format_wrappers.h).
// masked_* has no CUDA kernel: the reference (sparseode/ops/library.py) or the Triton kernels serve it.
#include <torch/library.h>

#include "../format_wrappers.h"
#include "spmm_cuda.h"

TORCH_LIBRARY_IMPL(sparseode, CUDA, m) {
  using namespace sparseode::cuda;
  sparseode::FormatWrappers<&bsr_spmm, &bsr_spmm_fm, &bsr_spmm_t, &bsr_sddmm>::register_all(m);
}
