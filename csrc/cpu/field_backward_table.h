// The raw-pointer kernel of the fused field's backward (field_backward_kernels.h), as one table per
// instruction-set variant (field_backward_{default,avx2,avx512}.cpp), picked at run time by
// field_backward_kernels() to match the forward's field_kernels(). Plain declarations only.
#pragma once

#include <cstdint>

#include "field_table.h"

namespace sparseode::cpu {

// One layer of the backward: the forward's layer (weights, pattern, scale, shift, saved products)
// plus W^T and the offsets of its gradients in a chunk's accumulator (-1: not wanted).
template <typename T>
struct FieldBackLayer {
  FieldLayer<T> fwd;               // fwd.saved: the forward's products (N, fwd.groups, B)
  const T* wt = nullptr;           // dense W^T (K, N) row-major, or CSR values in transposed order (nnz,)
  const int64_t* crow_t = nullptr;  // (K + 1,) transposed pattern of a CSR layer
  const int64_t* col_t = nullptr;   // (nnz,)
  int64_t gw = -1, gs = -1, gc = -1;  // offsets of dL/dW (nnz or N K), dL/dscale (N), dL/dshift (N)
};

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
};

// Per-thread buffers: three panels of (width, PW), two of (width, TB), and the chunk's accumulator
// of the weight, scale and shift gradients (zeroed by the caller, summed over chunks after).
template <typename T>
struct FieldBackScratch {
  T* adj;
  T* back;
  T* input;
  T* d1;
  T* d2;
  T* acc;
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
