// Dense-product semantics for NaN/Inf in x (the mirror of the CPU's poison_nonfinite,
// csrc/cpu/spmm_kernels.h): y[b, o] is NaN when sample b of x holds a NaN/Inf at a column that output
// row o does not store (0 * Inf in the dense product); stored columns went through the arithmetic.
//
// What it reads: one int flag per sample, set while x is read anyway where possible (the CSR kernel's
// batch-tile staging, load_x_tile), else by one detect pass over x; the poison pass then reads the
// flags, and x and the pattern only for the samples that hold a non-finite value. So an all-finite
// call costs no second read of x on the CSR path and one read on the others (nothing cheaper gives
// the dense semantics: a column no row stores is read by no kernel), as the CPU's check rides on the
// transpose it does anyway.
//
// x and y are addressed by strides, so one pass serves the batch-major (x (B, K), y (B, N)) and the
// feature-major (xT (K, B), yT (N, B)) products.
#pragma once

#include "cuda_common.cuh"

namespace sparseode::cuda {
namespace {

struct Strides {
  int64_t batch;    // between samples
  int64_t feature;  // between features
};

// Batch-major x (B, K): block b reads row b (coalesced) and sets flags[b] if it holds NaN/Inf.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    detect_rows_kernel(const T* __restrict__ x, int64_t K, int* __restrict__ flags) {
  const int64_t b = blockIdx.x;
  int local = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) local |= nonfinite(x[b * K + k]);
  if (__syncthreads_or(local) && threadIdx.x == 0) flags[b] = 1;
}

// Feature-major xT (K, B): grid (ceil(B / kThreads), ceil(K / kDetectRows)); thread t reads column
// b = blockIdx.x * kThreads + t of kDetectRows rows (coalesced across the block).
constexpr int64_t kDetectRows = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    detect_cols_kernel(const T* __restrict__ xT, int64_t K, int64_t B, int* __restrict__ flags) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kDetectRows, k1 = imin(K, k0 + kDetectRows);
  int local = 0;
  for (int64_t k = k0; k < k1; ++k) local |= nonfinite(xT[k * B + b]);
  if (local) atomicOr(flags + b, 1);
}

// Block b, only where flags[b] is set: every output block row that does not store all of sample b's
// non-finite entries gets NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    poison_kernel(const T* __restrict__ x, Strides xs, const int* __restrict__ flags, const int64_t* __restrict__ crow,
                  const int64_t* __restrict__ col, T* __restrict__ y, Strides ys, int64_t K, int64_t bh, int64_t bw,
                  int64_t n_brows) {
  const int64_t b = blockIdx.x;
  if (flags[b] == 0) return;  // uniform per block: an all-finite sample costs one flag read
  const T* xr = x + b * xs.batch;
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  int local = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) local += nonfinite(xr[k * xs.feature]);
  atomicAdd(&total, local);
  __syncthreads();
  const int all = total;
  const T nan = static_cast<T>(NAN);
  for (int64_t r = threadIdx.x; r < n_brows; r += blockDim.x) {
    int stored = 0;
    for (int64_t p = crow[r]; p < crow[r + 1]; ++p)
      for (int64_t j = 0; j < bw; ++j) stored += nonfinite(xr[(col[p] * bw + j) * xs.feature]);
    if (stored < all)
      for (int64_t i = 0; i < bh; ++i) y[b * ys.batch + (r * bh + i) * ys.feature] = nan;
  }
}

// The flags of a call: zeros, one int per sample.
inline at::Tensor nonfinite_flags(const at::Tensor& x, int64_t B) {
  return at::zeros({B}, x.options().dtype(at::kInt));
}

// Sets `flags` for the samples of x that hold NaN/Inf (feature_major: x is xT (K, B)).
template <typename T>
void detect_nonfinite(const T* x, int64_t B, int64_t K, bool feature_major, int* flags, cudaStream_t stream) {
  if (B == 0 || K == 0) return;
  if (feature_major) {
    const dim3 grid = checked_grid("detect_nonfinite_fm", ceil_div(B, kThreads), ceil_div(K, kDetectRows));
    detect_cols_kernel<T><<<grid, kThreads, 0, stream>>>(x, K, B, flags);
  } else {
    detect_rows_kernel<T><<<checked_grid("detect_nonfinite", B), kThreads, 0, stream>>>(x, K, flags);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// NaN in y (strides ys) where the dense product of x (strides xs) would have met a flagged NaN/Inf.
template <typename T>
void poison_nonfinite(const T* x, Strides xs, const int* flags, const at::Tensor& crow, const at::Tensor& col, T* y,
                      Strides ys, int64_t B, int64_t K, int64_t bh, int64_t bw, cudaStream_t stream) {
  if (B == 0) return;
  poison_kernel<T><<<checked_grid("poison_nonfinite", B), kThreads, 0, stream>>>(
      x, xs, flags, crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), y, ys, K, bh, bw, crow.size(0) - 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sparseode::cuda
