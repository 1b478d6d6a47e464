// The raw-pointer kernels of the fused field (field_kernels.h), as one table of function pointers
// per instruction-set variant (field_default.cpp, field_avx2.cpp, field_avx512.cpp), picked at run
// time by field_kernels(). Plain declarations only: read by baseline code and every variant alike.
#pragma once

#include <cstdint>

namespace sparseode::cpu {

// The activations of the fused field (the list of sparseode/activations.py).
enum class FieldAct : int { Identity = 0, Tanh, Relu, Softplus, Sigmoid, Elu, Swish };

// One layer: pre = scale * (W h) + shift, W dense (N, K) row-major (crow == nullptr) or CSR.
template <typename T>
struct FieldLayer {
  int64_t N = 0, K = 0;
  const T* w = nullptr;           // dense (N, K) or CSR values (nnz,)
  const int64_t* crow = nullptr;  // (N + 1,) or nullptr for a dense layer
  const int64_t* col = nullptr;   // (nnz,)
  const T* scale = nullptr;       // (N,) or nullptr (1)
  const T* shift = nullptr;       // (N,) or nullptr (0)
  T* saved = nullptr;             // (N, groups, B) products for the backward, or nullptr
  int64_t groups = 0;
};

// One call: batch B, state size d, m tangents, tile width TB (1, 2 or 4 SIMD vectors), panel
// width PW = (1 + m) TB; trace 0 none, 1 exact, 2 Hutchinson. z, probe and f are (B, d)
// batch-major, trace_out (B,) zeroed. iota holds 0, 1, ..., K - 1 for the widest dense layer (its
// rows are read as CSR rows that store every column).
template <typename T>
struct FieldCall {
  const FieldLayer<T>* layers;
  int64_t n_layers;
  int64_t B, d, m, TB, PW;
  int trace;
  FieldAct act;
  const T* z;
  const T* probe;
  T* f;
  T* trace_out;
  const int64_t* iota;
};

// Per-thread buffers of a tile: two panels of (width, PW) and a row of 2 PW.
template <typename T>
struct FieldScratch {
  T* a;
  T* b;
  T* row;
};

template <typename T>
struct FieldKernelsOf {
  // tiles [begin, end) of a call
  void (*tiles)(const FieldCall<T>&, int64_t begin, int64_t end, const FieldScratch<T>&);
};

struct FieldKernels {
  const char* name;
  int64_t lanes_f32, lanes_f64;  // SIMD lanes: tile widths are multiples of these
  FieldKernelsOf<float> f32;
  FieldKernelsOf<double> f64;
  template <typename T>
  const FieldKernelsOf<T>& of() const {
    if constexpr (sizeof(T) == sizeof(float)) {
      return f32;
    } else {
      return f64;
    }
  }
  template <typename T>
  int64_t lanes() const {
    return sizeof(T) == sizeof(float) ? lanes_f32 : lanes_f64;
  }
};

const FieldKernels& field_kernels_default();
const FieldKernels& field_kernels_avx2();
const FieldKernels& field_kernels_avx512();

// The widest variant this CPU runs, narrowed by SPARSEODE_CPU_CAPABILITY (default | avx2 | avx512).
const FieldKernels& field_kernels();

}  // namespace sparseode::cpu
