// CUDA kernels of the sparseode primitives for block-sparse weights (CSR is 1x1 blocks), the mirror
// of csrc/cpu/spmm_cpu.h with the same contracts; registered for the CUDA dispatch key in
// register_cuda.cu. Inputs must be on one CUDA device; float32, float64, float16 and bfloat16.
#pragma once

#include <ATen/ATen.h>

#include <string_view>

namespace sparseode::cuda {

// y = act(x W^T + bias): x (B, K), W (N, K) given by crow (N/bh + 1,), col (nnz,), values (nnz,)
// [CSR] or (nnz, bh, bw) [BSR]; returns (B, N). NaN/Inf in x propagate as in the dense product.
at::Tensor bsr_spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                    const c10::optional<at::Tensor>& bias, std::string_view activation);

// The same product feature-major: xT (K, B) -> yT (N, B), bias and activation on the first act_cols
// columns only (the others carry tangent directions: no bias, no activation).
at::Tensor bsr_spmm_fm(const at::Tensor& xT, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                       const c10::optional<at::Tensor>& bias, std::string_view activation, int64_t act_cols);

// dx = g W: g (B, N); (crow_t, col_t) is the pattern of W^T and perm[q] the block of `values` that
// the q-th stored block of W^T comes from. Returns (B, K).
at::Tensor bsr_spmm_t(const at::Tensor& g, const at::Tensor& values, const at::Tensor& crow_t,
                      const at::Tensor& col_t, const at::Tensor& perm);

// out[p, i, j] = sum_b a[b, r*bh + i] * c[b, col[p]*bw + j] for block p in block row r:
// a (B, N), c (B, K); returns (nnz,) when bh = bw = 1, else (nnz, bh, bw).
at::Tensor bsr_sddmm(const at::Tensor& a, const at::Tensor& c, const at::Tensor& crow, const at::Tensor& col,
                     int64_t bh, int64_t bw);

}  // namespace sparseode::cuda
