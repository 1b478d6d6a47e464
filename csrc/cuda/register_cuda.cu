// Registers the CUDA kernels (spmm_cuda.cu) as the CUDA implementations of the csr_* and bsr_* ops
// declared in csrc/ops.cpp, mirroring csrc/cpu/register_cpu.cpp. masked_* has no CUDA kernel: the
// reference (sparseode/ops/library.py) or the Triton kernels serve it.
#include <torch/library.h>

#include <string_view>

#include "spmm_cuda.h"

namespace sparseode::cuda {
namespace {

using at::Tensor;
using OptionalTensor = c10::optional<Tensor>;

Tensor csr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                const Tensor&, const Tensor&, const OptionalTensor& bias, std::string_view activation) {
  TORCH_CHECK(values.dim() == 1, "csr values must be 1-D, got ", values.dim(), "-D");
  return bsr_spmm(x, values, crow, col, bias, activation);
}

Tensor csr_spmm_fm(const Tensor& xT, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                   const Tensor&, const Tensor&, const OptionalTensor& bias, std::string_view activation,
                   int64_t act_cols) {
  TORCH_CHECK(values.dim() == 1, "csr values must be 1-D, got ", values.dim(), "-D");
  return bsr_spmm_fm(xT, values, crow, col, bias, activation, act_cols);
}

Tensor csr_spmm_t(const Tensor& g, const Tensor& values, const Tensor&, const Tensor&, const Tensor& crow_t,
                  const Tensor& col_t, const Tensor& perm) {
  return bsr_spmm_t(g, values, crow_t, col_t, perm);
}

Tensor csr_sddmm(const Tensor& a, const Tensor& c, const Tensor& crow, const Tensor& col, const Tensor&,
                 const Tensor&, const Tensor&) {
  return bsr_sddmm(a, c, crow, col, 1, 1);
}

Tensor bsr_spmm_masked(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                       const Tensor&, const Tensor&, const Tensor& block_mask, const OptionalTensor& bias,
                       std::string_view activation) {
  TORCH_CHECK(values.dim() == 3, "bsr values must be 3-D, got ", values.dim(), "-D");
  return bsr_spmm(x, values * block_mask, crow, col, bias, activation);
}

Tensor bsr_spmm_fm_masked(const Tensor& xT, const Tensor& values, const Tensor& crow, const Tensor& col,
                          const Tensor&, const Tensor&, const Tensor&, const Tensor& block_mask,
                          const OptionalTensor& bias, std::string_view activation, int64_t act_cols) {
  TORCH_CHECK(values.dim() == 3, "bsr values must be 3-D, got ", values.dim(), "-D");
  return bsr_spmm_fm(xT, values * block_mask, crow, col, bias, activation, act_cols);
}

Tensor bsr_spmm_t_masked(const Tensor& g, const Tensor& values, const Tensor&, const Tensor&, const Tensor& crow_t,
                         const Tensor& col_t, const Tensor& perm, const Tensor& block_mask) {
  return bsr_spmm_t(g, values * block_mask, crow_t, col_t, perm);
}

Tensor bsr_sddmm_masked(const Tensor& a, const Tensor& c, const Tensor& crow, const Tensor& col, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor& block_mask) {
  TORCH_CHECK(block_mask.dim() == 3, "block_mask must be 3-D (nnz_blocks, bh, bw), got ", block_mask.dim(), "-D");
  // (nnz,) for 1x1 blocks: shaped like values, (nnz, bh, bw), whatever the block
  return bsr_sddmm(a, c, crow, col, block_mask.size(1), block_mask.size(2)).view(block_mask.sizes()).mul_(block_mask);
}

}  // namespace
}  // namespace sparseode::cuda

TORCH_LIBRARY_IMPL(sparseode, CUDA, m) {
  using namespace sparseode::cuda;
  m.impl("csr_spmm", &csr_spmm);
  m.impl("csr_spmm_fm", &csr_spmm_fm);
  m.impl("csr_spmm_t", &csr_spmm_t);
  m.impl("csr_sddmm", &csr_sddmm);
  m.impl("bsr_spmm", &bsr_spmm_masked);
  m.impl("bsr_spmm_fm", &bsr_spmm_fm_masked);
  m.impl("bsr_spmm_t", &bsr_spmm_t_masked);
  m.impl("bsr_sddmm", &bsr_sddmm_masked);
}
