// The raw-pointer kernel of the fused field's backward (field_backward_kernels.h), as one table per
// instruction-set variant (field_backward_{default,avx2,avx512}.cpp), picked at run time by
// field_backward_kernels() to match the forward's field_kernels(). Plain declarations only.
#pragma once

#include <cstdint>

#include "field_table.h"

namespace sparseode::cpu {

// One layer of the backward: the forward's layer (weights, pattern, scale, shift, saved products)
// plus W^T and the offsets of its gradients in a chunk's accumulator (-1: not wanted). A wide layer
// dense enough that a dense GEMM beats its sparse rows (field_backward_cpu.cpp picks it) runs both
// of its products as GEMMs on the tile's panels: `dense` holds its (N, K) weights (zeros where a
// CSR layer stores nothing), and a CSR layer's dense weight gradient goes to the chunk's
// FieldBackScratch::dense_gw at offset `dense_gw`, gathered at its stored positions after the chunk.
template <typename T>
struct FieldBackLayer {
  FieldLayer<T> fwd;               // fwd.saved: the forward's products (N, fwd.groups, B)
  const T* wt = nullptr;           // dense W^T (K, N) row-major, or CSR values in transposed order (nnz,)
  const int64_t* crow_t = nullptr;  // (K + 1,) transposed pattern of a CSR layer
  const int64_t* col_t = nullptr;   // (nnz,)
  int64_t gw = -1, gs = -1, gc = -1;  // offsets of dL/dW (nnz or N K), dL/dscale (N), dL/dshift (N)
  const T* dense = nullptr;        // (N, K) row-major on the GEMM path, else nullptr
  int64_t dense_gw = -1;           // offset in FieldBackScratch::dense_gw (CSR layers on the GEMM path)
};

// Row-major c (M, N, row stride ldc) = [c +] op(a) op(b), op(a) (M, Kc), op(b) (Kc, N); a stored
// (M, Kc) with row stride lda, or (Kc, M) when trans_a (b likewise). Provided by the ATen side.
template <typename T>
using FieldGemm = void (*)(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t Kc, const T* a, int64_t lda,
                           const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc);

// One backward call. The forward's call had m tangents; the backward carries mb of them (m when the
// trace term has a gradient, else 0: the tangents' adjoints are then zero). Tiles of TB samples,
// panels of PW = (1 + mb) TB columns. gf (B, d) and gtr (B,) may be nullptr (zero); gz (B, d) and
// gprobe (B, d, Hutchinson with mb only, else nullptr) are written per sample.
template <typename T>
struct FieldBackCall {
  const FieldBackLayer<T>* layers;
  int64_t n_layers;
  int64_t B, d, m, mb, TB, PW;
  int trace;
  FieldAct act;
  const T* z;
  const T* probe;
  const T* gf;
  const T* gtr;
  T* gz;
  T* gprobe;
  FieldGemm<T> gemm;  // for the layers with FieldBackLayer::dense set
};

// Per-thread buffers: three panels of (width, PW), two of (width, TB), the chunk's accumulator
// of the weight, scale and shift gradients (zeroed by the caller, summed over chunks after) and
// the dense weight gradients of its CSR layers on the GEMM path (zeroed, gathered into acc after).
template <typename T>
struct FieldBackScratch {
  T* adj;
  T* back;
  T* input;
  T* d1;
  T* d2;
  T* acc;
  T* dense_gw;
};

template <typename T>
struct FieldBackwardKernelsOf {
  // tiles [begin, end) of a call, accumulating into scratch.acc
  void (*tiles)(const FieldBackCall<T>&, int64_t begin, int64_t end, const FieldBackScratch<T>&);
};

struct FieldBackwardKernels {
  const char* name;
  FieldBackwardKernelsOf<float> f32;
  FieldBackwardKernelsOf<double> f64;
  template <typename T>
  const FieldBackwardKernelsOf<T>& of() const {
    if constexpr (sizeof(T) == sizeof(float)) {
      return f32;
    } else {
      return f64;
    }
  }
};

const FieldBackwardKernels& field_backward_kernels_default();
const FieldBackwardKernels& field_backward_kernels_avx2();
const FieldBackwardKernels& field_backward_kernels_avx512();

// The variant of the same name as the forward's field_kernels().
const FieldBackwardKernels& field_backward_kernels();

}  // namespace sparseode::cpu
