// The schema of every sparseode op, declared once: one op per primitive and format,
// `<format>_<primitive>`. Backends register their kernels beside their sources (csrc/cpu/register_cpu.cpp,
// csrc/cuda), so an unbuilt backend is simply absent; csrc/autograd_ops.cpp registers their autograd;
// sparseode/ops/library.py registers the fake kernels and the pure-PyTorch reference as the fallback,
// and declares these same schemas (with the autograd formulas in Python) when this extension is not
// built (a test checks that they agree).
//
// A weight W (N, K) is `values` plus its pattern tensors, in the order of the pattern types in
// sparseode/ops/patterns.py:
//   masked: mask (N, K) bool; values (N, K)
//   csr:    crow (N + 1,), col (nnz,), crow_t (K + 1,), col_t (nnz,), perm (nnz,) int64; values (nnz,)
//   bsr:    the same over (bh, bw) blocks, plus block_mask (nnz, bh, bw) bool; values (nnz, bh, bw)
// Primitives: x (B, K), g and a (B, N), c (B, K):
//   spmm    act(x W^T + bias) -> (B, N)
//   spmm_fm the same feature-major: xT (K, B) -> (N, B), bias and activation on the first act_cols
//           columns only (the rest are tangent directions of forward-mode products)
//   spmm_t  g W -> (B, K)
//   sddmm   a^T c at the kept positions -> shaped like values
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import sparseode._C` loads this library, and loading it runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparseode, m) {
  m.def("masked_spmm(Tensor x, Tensor values, Tensor mask, Tensor? bias, str activation) -> Tensor");
  m.def("masked_spmm_fm(Tensor xT, Tensor values, Tensor mask, Tensor? bias, str activation, int act_cols) -> Tensor");
  m.def("masked_spmm_t(Tensor g, Tensor values, Tensor mask) -> Tensor");
  m.def("masked_sddmm(Tensor a, Tensor c, Tensor mask) -> Tensor");
  m.def("csr_spmm(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm, Tensor? bias, str activation) -> Tensor");
  m.def("csr_spmm_fm(Tensor xT, Tensor values, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm, Tensor? bias, str activation, int act_cols) -> Tensor");
  m.def("csr_spmm_t(Tensor g, Tensor values, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm) -> Tensor");
  m.def("csr_sddmm(Tensor a, Tensor c, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm) -> Tensor");
  m.def("bsr_spmm(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm, Tensor block_mask, Tensor? bias, str activation) -> Tensor");
  m.def("bsr_spmm_fm(Tensor xT, Tensor values, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm, Tensor block_mask, Tensor? bias, str activation, int act_cols) -> Tensor");
  m.def("bsr_spmm_t(Tensor g, Tensor values, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm, Tensor block_mask) -> Tensor");
  m.def("bsr_sddmm(Tensor a, Tensor c, Tensor crow, Tensor col, Tensor crow_t, Tensor col_t, Tensor perm, Tensor block_mask) -> Tensor");
  // The whole MLP vector field in one call (csrc/cpu/field_cpu.h): f (B, d), the trace term (B,)
  // (trace 0 none, 1 exact, 2 Hutchinson with `probe`) and, when `save`, the products the backward
  // needs; sparseode/nn/fused_field.py holds its fake kernel and autograd.
  m.def("mlp_field(Tensor z, Tensor? probe, Tensor[] weights, Tensor[] patterns, Tensor?[] scales, Tensor?[] shifts, str activation, int trace, bool save) -> (Tensor, Tensor, Tensor[])");
  // its hand-written backward (csrc/cpu/field_backward_cpu.cpp) from the forward's `saved` products:
  // (grad z, grad probe ((0,) unless Hutchinson with grad_trace), grad per weight, grad per scale and
  // per shift ((0,) where that entry is None))
  m.def("mlp_field_backward(Tensor z, Tensor? probe, Tensor[] weights, Tensor[] patterns, Tensor?[] scales, Tensor?[] shifts, Tensor[] saved, Tensor? grad_f, Tensor? grad_trace, str activation, int trace) -> (Tensor, Tensor, Tensor[], Tensor[], Tensor[])");
}
