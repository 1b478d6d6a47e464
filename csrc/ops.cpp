// The schema of every compiled sparseode kernel op, declared once. Backends register their
// implementations beside their kernels (csrc/cpu, csrc/cuda), so an unbuilt backend is simply absent.
//
// Shapes: x (B, K); a sparse weight W of shape (N, K) stored block-sparse: crow (N/bh + 1,),
// col (nnz_blocks,), values (nnz_blocks, bh, bw) or (nnz,) for CSR (bh = bw = 1).
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
  // y = act(x W^T + bias), (B, N)
  m.def("bsr_spmm(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor? bias, str activation) -> Tensor");
  // the same feature-major, inference only: xT (K, B) -> yT (N, B); bias and activation on the first
  // act_cols columns, none on the rest (tangent directions of forward-mode products)
  m.def("bsr_spmm_fm(Tensor xT, Tensor values, Tensor crow, Tensor col, Tensor? bias, str activation, int act_cols) -> Tensor");
  // dx = g W, (B, K), through the transposed pattern (crow_t, col_t) and the permutation `perm`
  // that maps each stored block of W^T to its block in `values`.
  m.def("bsr_spmm_t(Tensor g, Tensor values, Tensor crow_t, Tensor col_t, Tensor perm) -> Tensor");
  // out[p] = sum_b a[b, rows of block p] (outer) c[b, cols of block p], shaped like values.
  m.def("bsr_sddmm(Tensor a, Tensor c, Tensor crow, Tensor col, int bh, int bw) -> Tensor");
}
