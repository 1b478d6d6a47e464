// The csr_* and bsr_* ops of csrc/ops.cpp on one device's four block-sparse kernels, written once and
// instantiated per device (csrc/cpu/register_cpu.cpp, csrc/cuda/register_cuda.cu register them for
// their dispatch keys). The ops take a format's whole pattern so that their autograd formulas can
// call each other; each wrapper hands its kernel the part it needs. For BSR, the entries of a stored
// block that block_mask drops are zero in the weight the kernel sees and get no gradient, whatever
// `values` holds there. Kernels (namespace sparseode::<device>, declared in spmm_<device>.h):
//   spmm(x, values, crow, col, bias, activation), spmm_fm(xT, ..., activation, act_cols),
//   spmm_t(g, values, crow_t, col_t, perm), sddmm(a, c, crow, col, bh, bw).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>

namespace sparseode {

template <auto Spmm, auto SpmmFm, auto SpmmT, auto Sddmm>
struct FormatWrappers {
  using Tensor = at::Tensor;
  using OptionalTensor = c10::optional<at::Tensor>;

  static void check_values_dim(const Tensor& values, int64_t dim, const char* format) {
    TORCH_CHECK(values.dim() == dim, format, " values must be ", dim, "-D, got ", values.dim(), "-D");
  }

  static Tensor csr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                         const Tensor&, const Tensor&, const OptionalTensor& bias, std::string_view activation) {
    check_values_dim(values, 1, "csr");
    return Spmm(x, values, crow, col, bias, activation);
  }

  static Tensor csr_spmm_fm(const Tensor& xT, const Tensor& values, const Tensor& crow, const Tensor& col,
                            const Tensor&, const Tensor&, const Tensor&, const OptionalTensor& bias,
                            std::string_view activation, int64_t act_cols) {
    check_values_dim(values, 1, "csr");
    return SpmmFm(xT, values, crow, col, bias, activation, act_cols);
  }

  static Tensor csr_spmm_t(const Tensor& g, const Tensor& values, const Tensor&, const Tensor&, const Tensor& crow_t,
                           const Tensor& col_t, const Tensor& perm) {
    check_values_dim(values, 1, "csr");
    return SpmmT(g, values, crow_t, col_t, perm);
  }

  static Tensor csr_sddmm(const Tensor& a, const Tensor& c, const Tensor& crow, const Tensor& col, const Tensor&,
                          const Tensor&, const Tensor&) {
    return Sddmm(a, c, crow, col, 1, 1);
  }

  static Tensor bsr_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor& block_mask, const OptionalTensor& bias,
                         std::string_view activation) {
    check_values_dim(values, 3, "bsr");
    return Spmm(x, values * block_mask, crow, col, bias, activation);
  }

  static Tensor bsr_spmm_fm(const Tensor& xT, const Tensor& values, const Tensor& crow, const Tensor& col,
                            const Tensor&, const Tensor&, const Tensor&, const Tensor& block_mask,
                            const OptionalTensor& bias, std::string_view activation, int64_t act_cols) {
    check_values_dim(values, 3, "bsr");
    return SpmmFm(xT, values * block_mask, crow, col, bias, activation, act_cols);
  }

  static Tensor bsr_spmm_t(const Tensor& g, const Tensor& values, const Tensor&, const Tensor&, const Tensor& crow_t,
                           const Tensor& col_t, const Tensor& perm, const Tensor& block_mask) {
    check_values_dim(values, 3, "bsr");
    return SpmmT(g, values * block_mask, crow_t, col_t, perm);
  }

  static Tensor bsr_sddmm(const Tensor& a, const Tensor& c, const Tensor& crow, const Tensor& col, const Tensor&,
                          const Tensor&, const Tensor&, const Tensor& block_mask) {
    TORCH_CHECK(block_mask.dim() == 3, "block_mask must be 3-D (nnz_blocks, bh, bw), got ", block_mask.dim(), "-D");
    // (nnz,) for 1x1 blocks: shaped like values, (nnz, bh, bw), whatever the block
    return Sddmm(a, c, crow, col, block_mask.size(1), block_mask.size(2)).view(block_mask.sizes()).mul_(block_mask);
  }

  // Registers the eight ops for the dispatch key of `m` (a TORCH_LIBRARY_IMPL block).
  static void register_all(torch::Library& m) {
    m.impl("csr_spmm", &csr_spmm);
    m.impl("csr_spmm_fm", &csr_spmm_fm);
    m.impl("csr_spmm_t", &csr_spmm_t);
    m.impl("csr_sddmm", &csr_sddmm);
    m.impl("bsr_spmm", &bsr_spmm);
    m.impl("bsr_spmm_fm", &bsr_spmm_fm);
    m.impl("bsr_spmm_t", &bsr_spmm_t);
    m.impl("bsr_sddmm", &bsr_sddmm);
  }
};

}  // namespace sparseode
