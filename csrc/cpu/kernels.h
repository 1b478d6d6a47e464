// The per-variant kernel source: the spmm kernels (spmm_kernels.h), the sddmm kernel (the weight
// gradient on the stored blocks) and the kernel table, compiled once per variant (variants/*.cpp).
#pragma once

#include "kernel_prelude.h"
#include "spmm_kernels.h"

namespace sparseode::cpu::SPARSEODE_CPU_VARIANT {

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  constexpr int L = 8;
  T acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) acc[l] += a[i + l] * b[i + l];
  T s = 0;
  for (int l = 0; l < L; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The sddmm of kernel_table.h: block rows over the threads, each stored block a sum of dot products
// across the batch.
template <typename T>
void sddmm(const SddmmArgs<T>& args) {
  const int64_t B = args.B, n_brows = args.n_brows, bh = args.bh, bw = args.bw;
  const T* ap = args.aT;
  const T* cp = args.cT;
  const int64_t* cr = args.crow;
  const int64_t* cl = args.col;
  T* op = args.out;
  const int64_t bsize = bh * bw;
  // Batch chunks keep the slice of cT that a row touches in cache.
  constexpr int64_t kChunk = 512;
  parallel_range(n_brows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t p = cr[r]; p < cr[r + 1]; ++p)
        for (int64_t e = 0; e < bsize; ++e) op[p * bsize + e] = T(0);
      for (int64_t b0 = 0; b0 < B; b0 += kChunk) {
        const int64_t nb = std::min(kChunk, B - b0);
        for (int64_t p = cr[r]; p < cr[r + 1]; ++p) {
          for (int64_t i = 0; i < bh; ++i) {
            const T* arow = ap + (r * bh + i) * B + b0;
            for (int64_t j = 0; j < bw; ++j) {
              op[p * bsize + i * bw + j] += dot(arow, cp + (cl[p] * bw + j) * B + b0, nb);
            }
          }
        }
      }
    }
  });
}

// The kernel table of this variant (kernel_table.h).
inline KernelTable make_table(const char* name) {
  return KernelTable{name, &spmm<float>, &spmm<double>, &sddmm<float>, &sddmm<double>};
}

}  // namespace sparseode::cpu::SPARSEODE_CPU_VARIANT
