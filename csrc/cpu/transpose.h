// Cache-friendly out-of-place transposes for moving batch tiles between the batch-major layout of
// the caller and the feature-major layout of the kernels. Full 8x8 (float) / 4x4 (double) tiles use
// AVX shuffles in the variants that have AVX (SPARSEODE_CPU_AVX); edges and the baseline variant use
// the scalar loop. Part of the per-variant kernel source: see kernels.h.
#pragma once

#include "kernel_prelude.h"

namespace sparseode::cpu::SPARSEODE_CPU_VARIANT {

#if SPARSEODE_CPU_AVX
// Each tile transpose also adds (sum of the tile) * 0 into `check`, which stays 0 unless the tile
// holds NaN or Inf (or finite values whose sum overflows: a false alarm the caller re-checks).
inline void transpose_tile(const float* src, int64_t ld, float* dst, int64_t ld_dst, __m256& check) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * ld), r1 = _mm256_loadu_ps(src + 1 * ld);
  __m256 r2 = _mm256_loadu_ps(src + 2 * ld), r3 = _mm256_loadu_ps(src + 3 * ld);
  __m256 r4 = _mm256_loadu_ps(src + 4 * ld), r5 = _mm256_loadu_ps(src + 5 * ld);
  __m256 r6 = _mm256_loadu_ps(src + 6 * ld), r7 = _mm256_loadu_ps(src + 7 * ld);
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(r0, r1), _mm256_add_ps(r2, r3)),
                                   _mm256_add_ps(_mm256_add_ps(r4, r5), _mm256_add_ps(r6, r7)));
  check = _mm256_add_ps(check, _mm256_mul_ps(sum, _mm256_setzero_ps()));
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x31));
}

inline void transpose_tile(const double* src, int64_t ld, double* dst, int64_t ld_dst, __m256d& check) {
  __m256d r0 = _mm256_loadu_pd(src + 0 * ld), r1 = _mm256_loadu_pd(src + 1 * ld);
  __m256d r2 = _mm256_loadu_pd(src + 2 * ld), r3 = _mm256_loadu_pd(src + 3 * ld);
  const __m256d sum = _mm256_add_pd(_mm256_add_pd(r0, r1), _mm256_add_pd(r2, r3));
  check = _mm256_add_pd(check, _mm256_mul_pd(sum, _mm256_setzero_pd()));
  __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(dst + 0 * ld_dst, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + 1 * ld_dst, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 2 * ld_dst, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 3 * ld_dst, _mm256_permute2f128_pd(t1, t3, 0x31));
}
template <typename T>
constexpr int64_t kTile = 32 / sizeof(T);

// The AVX register of T (a trait: __m256 as a template argument drops its alignment attribute).
template <typename T>
struct AvxOf {
  using type = __m256;
};
template <>
struct AvxOf<double> {
  using type = __m256d;
};

inline bool any_nonzero(__m256 v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ)) != 0; }
inline bool any_nonzero(__m256d v) {
  return _mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_NEQ_UQ)) != 0;
}
#endif

// Scalar transpose that also reports whether it met a NaN or Inf.
template <typename T>
inline bool transpose_scalar_checked(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows,
                                     int64_t cols) {
  T check = T(0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * ld_dst + r] = src[r * ld_src + c];
      check += src[r * ld_src + c] * T(0);
    }
  return check != T(0);
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols. Returns true when src may hold
// NaN or Inf (never false when it does).
template <typename T>
inline bool transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
#if SPARSEODE_CPU_AVX
  constexpr int64_t t = kTile<T>;
  const int64_t rows_full = rows - rows % t, cols_full = cols - cols % t;
  typename AvxOf<T>::type check{};
  for (int64_t r = 0; r < rows_full; r += t)
    for (int64_t c = 0; c < cols_full; c += t)
      transpose_tile(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst, check);
  bool bad = any_nonzero(check);
  bad |= transpose_scalar_checked(src + cols_full, ld_src, dst + cols_full * ld_dst, ld_dst, rows, cols - cols_full);
  bad |= transpose_scalar_checked(src + rows_full * ld_src, ld_src, dst + rows_full, ld_dst, rows - rows_full,
                                  cols_full);
  return bad;
#else
  return transpose_scalar_checked(src, ld_src, dst, ld_dst, rows, cols);
#endif
}

}  // namespace sparseode::cpu::SPARSEODE_CPU_VARIANT
