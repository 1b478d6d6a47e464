// The raw-pointer kernels behind the CPU ops, as one table of function pointers per instruction-set
// variant. csrc/cpu/variants/*.cpp compile the same kernel source (kernels.h) once per variant;
// dispatch.cpp picks the table at run time (dispatch.h). Only plain declarations here: this header
// is read by the baseline code and by every variant alike.
#pragma once

#include <cstdint>

#include "../common.h"

namespace sparseode::cpu {

// y = act(x W^T + bias). act_cols < 0: batch-major x (B, K) -> y (B, N). act_cols >= 0:
// feature-major x (K, B) -> y (N, B), bias and activation on the first act_cols columns only.
// W (N, K) is block-sparse: crow (N/bh + 1,), col (nnz_blocks,), values (nnz_blocks, bh, bw).
// Every pointer is to contiguous memory; bias may be null.
template <typename T>
struct SpmmArgs {
  const T* x;
  const T* values;
  const int64_t* crow;
  const int64_t* col;
  const T* bias;
  Activation act;
  int64_t act_cols;
  int64_t B, K, N, bh, bw;
  T* y;
};

// out[p, i, j] = sum_b aT[r*bh + i, b] * cT[col[p]*bw + j, b] for block p of block row r:
// aT (n_brows * bh, B) and cT (K, B) feature-major, out (nnz_blocks, bh, bw).
template <typename T>
struct SddmmArgs {
  const T* aT;
  const T* cT;
  const int64_t* crow;
  const int64_t* col;
  int64_t B, n_brows, bh, bw;
  T* out;
};

struct KernelTable {
  const char* name;  // the capability: "default", "avx2", "avx512" or "native"
  void (*spmm_f32)(const SpmmArgs<float>&);
  void (*spmm_f64)(const SpmmArgs<double>&);
  void (*sddmm_f32)(const SddmmArgs<float>&);
  void (*sddmm_f64)(const SddmmArgs<double>&);
};

// One table per compiled variant (only those of the build exist: see setup.py).
const KernelTable& kernel_table_default();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_avx512();
const KernelTable& kernel_table_native();

// Threading for the variants, defined once in baseline code (dispatch.cpp) so that no ATen inline
// function is compiled for a wider instruction set and then shared through the linker.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t n, int64_t grain, RangeFn fn, void* ctx);
int64_t num_threads();

}  // namespace sparseode::cpu
