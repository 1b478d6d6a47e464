// The two sparse products of the fused field's backward, on feature-major panels (features x
// columns, columns = batch x (1 + tangents), contiguous), so the backward never transposes:
//   field_spmm_t_fm: W^T a for a CSR weight given by its transposed pattern, (N, P) -> (K, P)
//   field_sddmm_fm:  (a c^T) at the stored positions of a CSR weight: a (N, P), c (K, P) -> (nnz,)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "field_table.h"

namespace sparseode::cpu {
namespace {

// Columns per task of W^T a: a chunk of every row of `a` stays in L2 while the rows that read it
// are computed.
constexpr int64_t kChunk = 512;

void check_panel(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D feature-major panel, got shape ", t.sizes());
  CHECK_DEVICE_TYPE(t, at::kCPU);
  CHECK_FLOATING(t);
}

template <typename T>
void spmm_t_fm_impl(const T* a, const T* values_t, const int64_t* crow_t, const int64_t* col_t, int64_t K,
                    int64_t P, T* out) {
  const auto row = field_kernels().of<T>().transposed_row;
  const int64_t n_chunks = (P + kChunk - 1) / kChunk;
  at::parallel_for(0, n_chunks * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task % K, j0 = (task / K) * kChunk, j1 = std::min(P, j0 + kChunk);
      row(a, values_t, crow_t, col_t, P, k, j0, j1, out + k * P + j0);
    }
  });
}

template <typename T>
void sddmm_fm_impl(const T* a, const T* c, const int64_t* crow, const int64_t* col, int64_t N, int64_t P, T* out) {
  const auto rows = field_kernels().of<T>().sddmm_rows;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) { rows(a, c, crow, col, P, begin, end, out); });
}

}  // namespace

at::Tensor field_spmm_t_fm(const at::Tensor& a_in, const at::Tensor& values_t, const at::Tensor& crow_t,
                           const at::Tensor& col_t) {
  check_panel(a_in, "a");
  CHECK_INDEX(crow_t);
  CHECK_INDEX(col_t);
  CHECK_SAME_DTYPE(a_in, values_t);
  TORCH_CHECK(values_t.dim() == 1 && values_t.size(0) == col_t.size(0), "values_t must have shape (",
              col_t.size(0), ",), got ", values_t.sizes());
  const int64_t K = crow_t.size(0) - 1, P = a_in.size(1);
  const at::Tensor a = a_in.contiguous(), v = values_t.contiguous(), cr = crow_t.contiguous(), cl = col_t.contiguous();
  at::Tensor out = at::empty({K, P}, a.options());
  if (K == 0 || P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "field_spmm_t_fm", [&] {
    spmm_t_fm_impl<scalar_t>(a.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), cr.data_ptr<int64_t>(),
                             cl.data_ptr<int64_t>(), K, P, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor field_sddmm_fm(const at::Tensor& a_in, const at::Tensor& c_in, const at::Tensor& crow,
                          const at::Tensor& col) {
  check_panel(a_in, "a");
  check_panel(c_in, "c");
  CHECK_SAME_DTYPE(a_in, c_in);
  CHECK_INDEX(crow);
  CHECK_INDEX(col);
  TORCH_CHECK(a_in.size(1) == c_in.size(1), "a and c must have the same columns, got ", a_in.size(1), " and ",
              c_in.size(1));
  TORCH_CHECK(a_in.size(0) == crow.size(0) - 1, "a has ", a_in.size(0), " rows, the pattern ", crow.size(0) - 1);
  const at::Tensor a = a_in.contiguous(), c = c_in.contiguous(), cr = crow.contiguous(), cl = col.contiguous();
  at::Tensor out = at::empty({col.size(0)}, a.options());
  if (col.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "field_sddmm_fm", [&] {
    sddmm_fm_impl<scalar_t>(a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), cr.data_ptr<int64_t>(),
                            cl.data_ptr<int64_t>(), a.size(0), a.size(1), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace sparseode::cpu

TORCH_LIBRARY_IMPL(sparseode, CPU, m) {
  m.impl("field_spmm_t_fm", &sparseode::cpu::field_spmm_t_fm);
  m.impl("field_sddmm_fm", &sparseode::cpu::field_sddmm_fm);
}
