// Registers the CPU kernels (spmm_cpu.h) as the CPU implementations of the csr_* and bsr_* ops
// declared in csrc/ops.cpp (masked_* has no CPU kernel: the reference, a dense matmul, serves it).
// The ops take a format's whole pattern so that their autograd formulas can call each other; each
// kernel reads the part it needs. Kept apart from the kernels so the op layer can change names and
// signatures here without touching kernel code.
#include <torch/library.h>

#include <string_view>

#include "spmm_cpu.h"

namespace sparseode::cpu {
namespace {

using at::Tensor;
using OptionalTensor = c10::optional<Tensor>;

void check_values_dim(const Tensor& values, int64_t dim, const char* format) {
  TORCH_CHECK(values.dim() == dim, format, " values must be ", dim, "-D, got ", values.dim(), "-D");
}

Tensor csr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                const Tensor&, const Tensor&, const OptionalTensor& bias, std::string_view activation) {
  check_values_dim(values, 1, "csr");
  return bsr_spmm(x, values, crow, col, bias, activation);
}

Tensor csr_spmm_fm(const Tensor& xT, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                   const Tensor&, const Tensor&, const OptionalTensor& bias, std::string_view activation,
                   int64_t act_cols) {
  check_values_dim(values, 1, "csr");
  return bsr_spmm_fm(xT, values, crow, col, bias, activation, act_cols);
}

Tensor csr_spmm_t(const Tensor& g, const Tensor& values, const Tensor&, const Tensor&, const Tensor& crow_t,
                  const Tensor& col_t, const Tensor& perm) {
  check_values_dim(values, 1, "csr");
  return bsr_spmm_t(g, values, crow_t, col_t, perm);
}

Tensor csr_sddmm(const Tensor& a, const Tensor& c, const Tensor& crow, const Tensor& col, const Tensor&,
                 const Tensor&, const Tensor&) {
  return bsr_sddmm(a, c, crow, col, 1, 1);
}

// BSR: the entries of a stored block that block_mask drops are zero in the weight the kernel
// sees and get no gradient, whatever `values` holds there.
Tensor bsr_spmm_masked(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                       const Tensor&, const Tensor&, const Tensor& block_mask, const OptionalTensor& bias,
                       std::string_view activation) {
  check_values_dim(values, 3, "bsr");
  return bsr_spmm(x, values * block_mask, crow, col, bias, activation);
}

Tensor bsr_spmm_fm_masked(const Tensor& xT, const Tensor& values, const Tensor& crow, const Tensor& col,
                          const Tensor&, const Tensor&, const Tensor&, const Tensor& block_mask,
                          const OptionalTensor& bias, std::string_view activation, int64_t act_cols) {
  check_values_dim(values, 3, "bsr");
  return bsr_spmm_fm(xT, values * block_mask, crow, col, bias, activation, act_cols);
}

Tensor bsr_spmm_t_masked(const Tensor& g, const Tensor& values, const Tensor&, const Tensor&, const Tensor& crow_t,
                         const Tensor& col_t, const Tensor& perm, const Tensor& block_mask) {
  check_values_dim(values, 3, "bsr");
  return bsr_spmm_t(g, values * block_mask, crow_t, col_t, perm);
}

Tensor bsr_sddmm_masked(const Tensor& a, const Tensor& c, const Tensor& crow, const Tensor& col, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor& block_mask) {
  TORCH_CHECK(block_mask.dim() == 3, "block_mask must be 3-D (nnz_blocks, bh, bw), got ", block_mask.dim(), "-D");
  // (nnz,) for 1x1 blocks: shaped like values, (nnz, bh, bw), whatever the block
  return bsr_sddmm(a, c, crow, col, block_mask.size(1), block_mask.size(2)).view(block_mask.sizes()).mul_(block_mask);
}

}  // namespace
}  // namespace sparseode::cpu

TORCH_LIBRARY_IMPL(sparseode, CPU, m) {
  using namespace sparseode::cpu;
  m.impl("csr_spmm", &csr_spmm);
  m.impl("csr_spmm_fm", &csr_spmm_fm);
  m.impl("csr_spmm_t", &csr_spmm_t);
  m.impl("csr_sddmm", &csr_sddmm);
  m.impl("bsr_spmm", &bsr_spmm_masked);
  m.impl("bsr_spmm_fm", &bsr_spmm_fm_masked);
  m.impl("bsr_spmm_t", &bsr_spmm_t_masked);
  m.impl("bsr_sddmm", &bsr_sddmm_masked);
}
