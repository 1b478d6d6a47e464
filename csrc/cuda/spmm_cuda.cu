// CUDA kernels of the three sparseode primitives for block-sparse weights (CSR is 1x1 blocks): the
// mirror of csrc/cpu/spmm_cpu.cpp, registered under the same ops for the CUDA dispatch key.
//
//   bsr_spmm    CSR: rows split over thread blocks by stored entries (binary search on crow), rows
//               handed to groups of lanes sized by the mean row length through a shared counter, a
//               batch tile of x held feature-major in shared memory, 16-byte loads.
//               BSR: tensor cores (WMMA, fp16/bf16, blocks multiple of 16), else a shared-memory
//               tiled kernel (fp32/fp64, other blocks). Fused bias + activation epilogue.
//   bsr_spmm_t  as on the CPU: the values gathered through `perm` (blocks transposed), then bsr_spmm
//               on the transposed pattern.
//   bsr_sddmm   CSR: one warp per stored entry over the feature-major operands; BSR: tensor cores or
//               a tiled kernel per stored block; a long batch over few blocks is split into partial
//               sums that are added afterwards (deterministic, no atomics).
//   A last pass gives NaN/Inf in x the dense product's semantics, as the CPU kernels do.
//
// Every launch runs on the current stream of the inputs' device, under a device guard, and is
// followed by C10_CUDA_KERNEL_LAUNCH_CHECK(). Nothing synchronises with the host, so the ops can be
// captured in CUDA graphs. The stream comes from c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream
// is that same function re-exported by ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE
// headers: this file compiles with the CUDA runtime headers alone).
// A CPU-only torch (the CI compile check) ships c10/cuda headers without the configure-generated
// one; it only carries Windows export switches, so without it the defaults are right.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "../common.h"

namespace sparseode::cuda {
namespace {

constexpr int kThreads = 256;
// Shared memory a CSR thread block may use for its batch tile of x.
constexpr int64_t kTileBytes = 64 * 1024;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

template <typename T>
constexpr bool kHalfType = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// The CUDA type behind a torch half type, for the WMMA fragments.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

// The epilogue activation (torch's definitions; NaN propagates). A runtime switch: it is uniform
// across the grid, so it costs a branch per output, not a kernel per activation.
template <typename A>
__device__ __forceinline__ A activate(A v, Activation act) {
  switch (act) {
    case Activation::Tanh: return tanh(v);
    case Activation::Relu: return v < A(0) ? A(0) : v;
    case Activation::Softplus: return v > A(20) ? v : log1p(exp(v));
    case Activation::Sigmoid: return A(1) / (A(1) + exp(-v));
    case Activation::Elu: return v > A(0) ? v : expm1(v);
    default: return v;
  }
}

template <typename T>
__device__ __forceinline__ bool nonfinite(T v) {
  return !isfinite(static_cast<acc_t<T>>(v));
}

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Last r in [0, n_rows) with crow[r] <= p: the row holding stored entry p.
__device__ __forceinline__ int64_t row_of(const int64_t* __restrict__ crow, int64_t n_rows, int64_t p) {
  int64_t lo = 0, hi = n_rows;  // invariant: crow[lo] <= p < crow[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (crow[mid] <= p) lo = mid; else hi = mid;
  }
  return lo;
}

// First r in [0, n] with crow[r] >= target.
__device__ __forceinline__ int64_t first_row_from(const int64_t* __restrict__ crow, int64_t n, int64_t target) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (crow[mid] < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Copies 8 consecutive elements of a 16-bit type (one 16-byte load when `vec`), zeros when !ok.
template <typename T>
__device__ __forceinline__ void copy8(T* __restrict__ dst, const T* __restrict__ src, bool ok, bool vec) {
  static_assert(sizeof(T) == 2, "copy8 moves 16 bytes of a 16-bit type");
  if (!ok) {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = T(0);
  } else if (vec) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = src[e];
  }
}

// BT consecutive elements from shared memory, with the widest load their size allows.
template <typename T, int BT, typename A>
__device__ __forceinline__ void load_column(const T* __restrict__ p, A (&out)[BT]) {
  constexpr int kBytes = BT * static_cast<int>(sizeof(T));
  alignas(16) T tmp[BT];
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) reinterpret_cast<uint4*>(tmp)[q] = reinterpret_cast<const uint4*>(p)[q];
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(tmp) = *reinterpret_cast<const uint2*>(p);
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<unsigned*>(tmp) = *reinterpret_cast<const unsigned*>(p);
  } else {
#pragma unroll
    for (int b = 0; b < BT; ++b) tmp[b] = p[b];
  }
#pragma unroll
  for (int b = 0; b < BT; ++b) out[b] = static_cast<A>(tmp[b]);
}

// Copies batch rows [b0, b0 + nb) of x (B, K) into xs (K, BT), feature-major, zero-padding rows
// nb..BT. With `vec` (x 16-byte aligned, K * sizeof(T) a multiple of 16) every thread moves 16 bytes.
template <typename T, int BT>
__device__ void load_x_tile(const T* __restrict__ x, int64_t K, int64_t b0, int nb, bool vec, T* __restrict__ xs) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {
    const int64_t chunks = K / V;
    for (int64_t q = threadIdx.x; q < chunks * BT; q += blockDim.x) {
      const int b = static_cast<int>(q / chunks);
      const int64_t k = (q % chunks) * V;
      alignas(16) T v[V];
      if (b < nb) {
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(x + (b0 + b) * K + k);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = T(0);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) xs[(k + e) * BT + b] = v[e];
    }
  } else {
    for (int64_t q = threadIdx.x; q < K * BT; q += blockDim.x) {
      const int b = static_cast<int>(q / K);
      const int64_t k = q % K;
      xs[k * BT + b] = b < nb ? x[(b0 + b) * K + k] : T(0);
    }
  }
}

// Calls f(value, column) for the stored entries of [start, end) owned by lane `lane` of a group of
// `vs` lanes. With `vec`, the aligned middle of the row is read V entries per lane at a time with
// 16-byte loads of values and columns; the unaligned head and the tail one entry per lane.
template <typename T, typename F>
__device__ __forceinline__ void for_row_entries(const T* __restrict__ values, const int64_t* __restrict__ col,
                                                int64_t start, int64_t end, int lane, int vs, bool vec, F&& f) {
  constexpr int V = 16 / sizeof(T) >= 2 ? 16 / sizeof(T) : 2;  // entries per 16-byte load of values
  int64_t head = end, body_end = end;
  if (vec) {
    head = imin(end, (start + V - 1) / V * V);
    body_end = head + (end - head) / V * V;
  }
  for (int64_t p = start + lane; p < head; p += vs) f(values[p], col[p]);
  for (int64_t p = head + static_cast<int64_t>(lane) * V; p < body_end; p += static_cast<int64_t>(vs) * V) {
    alignas(16) T v[V];
    alignas(16) int64_t k[V];
#pragma unroll
    for (int q = 0; q < static_cast<int>(V * sizeof(T)) / 16; ++q)
      reinterpret_cast<uint4*>(v)[q] = reinterpret_cast<const uint4*>(values + p)[q];
#pragma unroll
    for (int q = 0; q < V / 2; ++q) reinterpret_cast<uint4*>(k)[q] = reinterpret_cast<const uint4*>(col + p)[q];
#pragma unroll
    for (int e = 0; e < V; ++e) f(v[e], k[e]);
  }
  for (int64_t p = body_end + lane; p < end; p += vs) f(values[p], col[p]);
}

// ---------------------------------------------------------------------------------------------
// spmm, CSR
// ---------------------------------------------------------------------------------------------

// Grid (ceil(B / BT), S): block (t, s) computes batch rows [t*BT, t*BT + BT) for the rows whose first
// stored entry lies in the s-th of S equal shares of the entries (so splits carry equal work, found
// by binary search on crow). Inside the block, groups of `vs` lanes take rows from a shared counter
// (a long row keeps its group busy, the others move on). With SMEM the batch tile of x sits
// feature-major in shared memory (xs[k * BT + b]), so one stored entry reads its BT inputs with one
// vector load; without it (K too wide) they are read from global memory.
template <typename T, int BT, bool SMEM>
__global__ void __launch_bounds__(kThreads)
    csr_spmm_kernel(const T* __restrict__ x, const T* __restrict__ values, const int64_t* __restrict__ crow,
                    const int64_t* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y, int64_t B,
                    int64_t K, int64_t N, int vs, bool vec_x, bool vec_v, Activation act) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  __shared__ unsigned long long next_row;
  __shared__ int64_t row_end;

  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * BT;
  const int nb = static_cast<int>(imin(BT, B - b0));
  if (threadIdx.x == 0) {
    const int64_t nnz = crow[N], S = gridDim.y, s = blockIdx.y;
    next_row = static_cast<unsigned long long>(first_row_from(crow, N, nnz * s / S));
    row_end = s + 1 == S ? N : first_row_from(crow, N, nnz * (s + 1) / S);
  }
  if constexpr (SMEM) load_x_tile<T, BT>(x, K, b0, nb, vec_x, xs);
  __syncthreads();

  const int lane = threadIdx.x % vs;
  const int first_lane = (threadIdx.x % 32) / vs * vs;
  const unsigned group = vs == 32 ? 0xffffffffu : ((1u << vs) - 1u) << first_lane;
  const int64_t r_end = row_end;
  while (true) {
    unsigned long long claimed = 0;
    if (lane == 0) claimed = atomicAdd(&next_row, 1ULL);
    const int64_t row = static_cast<int64_t>(__shfl_sync(group, claimed, 0, vs));
    if (row >= r_end) break;
    A acc[BT];
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[b] = A(0);
    for_row_entries(values, col, crow[row], crow[row + 1], lane, vs, vec_v, [&](T v, int64_t k) {
      const A w = static_cast<A>(v);
      if constexpr (SMEM) {
        A xv[BT];
        load_column<T, BT>(xs + k * BT, xv);
#pragma unroll
        for (int b = 0; b < BT; ++b) acc[b] += w * xv[b];
      } else {
#pragma unroll
        for (int b = 0; b < BT; ++b)
          if (b < nb) acc[b] += w * static_cast<A>(x[(b0 + b) * K + k]);
      }
    });
    for (int off = vs / 2; off > 0; off /= 2) {
#pragma unroll
      for (int b = 0; b < BT; ++b) acc[b] += __shfl_xor_sync(group, acc[b], off, vs);
    }
    if (lane == 0) {
      const A add = bias != nullptr ? static_cast<A>(bias[row]) : A(0);
#pragma unroll
      for (int b = 0; b < BT; ++b)
        if (b < nb) y[(b0 + b) * N + row] = static_cast<T>(activate(acc[b] + add, act));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// spmm, BSR
// ---------------------------------------------------------------------------------------------
constexpr int kTB = 64;  // batch rows per thread block (plain kernels)
constexpr int kTI = 32;  // block rows per thread block
constexpr int kTJ = 32;  // reduction chunk

// Grid (N / bh, ceil(B / 64), ceil(bh / 32)): a (64 batch x 32 block-row) output tile, accumulated
// over the stored blocks of block row r in chunks of 32 columns staged in shared memory; each thread
// owns 2 x 4 outputs. Any dtype and block shape.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bsr_spmm_kernel(const T* __restrict__ x, const T* __restrict__ values, const int64_t* __restrict__ crow,
                    const int64_t* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y, int64_t B,
                    int64_t K, int64_t N, int64_t bh, int64_t bw, Activation act) {
  using A = acc_t<T>;
  __shared__ A xs[kTB][kTJ + 1];
  __shared__ A ws[kTI][kTJ + 1];
  const int64_t r = blockIdx.x;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kTB;
  const int64_t i0 = static_cast<int64_t>(blockIdx.z) * kTI;
  const int t = threadIdx.x, ti = t % 16, tb = t / 16;
  A acc[2][4] = {};
  for (int64_t p = crow[r]; p < crow[r + 1]; ++p) {
    const int64_t kbase = col[p] * bw;
    const T* vblock = values + p * bh * bw;
    for (int64_t j0 = 0; j0 < bw; j0 += kTJ) {
      const int jw = static_cast<int>(imin(kTJ, bw - j0));
      for (int e = t; e < kTB * kTJ; e += kThreads) {
        const int bb = e / kTJ, jj = e % kTJ;
        xs[bb][jj] = (b0 + bb < B && jj < jw) ? static_cast<A>(x[(b0 + bb) * K + kbase + j0 + jj]) : A(0);
      }
      for (int e = t; e < kTI * kTJ; e += kThreads) {
        const int ii = e / kTJ, jj = e % kTJ;
        ws[ii][jj] = (i0 + ii < bh && jj < jw) ? static_cast<A>(vblock[(i0 + ii) * bw + j0 + jj]) : A(0);
      }
      __syncthreads();
      for (int jj = 0; jj < jw; ++jj) {
        const A w0 = ws[ti][jj], w1 = ws[ti + 16][jj];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const A xv = xs[tb + 16 * m][jj];
          acc[0][m] += w0 * xv;
          acc[1][m] += w1 * xv;
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int64_t i = i0 + ti + 16 * u;
    if (i >= bh) continue;
    const int64_t row = r * bh + i;
    const A add = bias != nullptr ? static_cast<A>(bias[row]) : A(0);
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t b = b0 + tb + 16 * m;
      if (b < B) y[b * N + row] = static_cast<T>(activate(acc[u][m] + add, act));
    }
  }
}

constexpr int kWarps = 4;  // warps per thread block (tensor-core kernels)

// Tensor cores, fp16/bf16, bh and bw multiples of 16. Grid (N / bh, ceil(B / 64), bh / (16 NF)):
// warp w computes batch rows [16w, 16w + 16) of the block's 64 against NF 16-row slices of block
// row r, over the stored blocks in 16-column steps: x's 16 x 16 tile is staged in shared memory
// (one 16-byte load per lane, zeros past B), the block's slices are read as col-major B fragments
// (W^T) straight from `values`, and float accumulators go through shared memory to the epilogue.
template <typename T, int NF>
__global__ void __launch_bounds__(kWarps * 32)
    bsr_spmm_wmma_kernel(const T* __restrict__ x, const T* __restrict__ values, const int64_t* __restrict__ crow,
                         const int64_t* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y,
                         int64_t B, int64_t K, int64_t N, int64_t bh, int64_t bw, bool vec_x, Activation act) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel only on sm_80+ (tensor_cores())
#else
  using namespace nvcuda;
  using W = typename CudaType<T>::type;
  __shared__ __align__(32) T a_stage[kWarps][16 * 16];
  __shared__ __align__(32) float c_stage[kWarps][16 * 16 * NF];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = blockIdx.x;
  const int64_t xrow0 = static_cast<int64_t>(blockIdx.y) * (kWarps * 16) + warp * 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.z) * 16 * NF;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.0f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> b;
  const int arow = lane / 2, acol = (lane % 2) * 8;
  const int64_t xb = xrow0 + arow;
  for (int64_t p = crow[r]; p < crow[r + 1]; ++p) {
    const int64_t kbase = col[p] * bw;
    const T* vblock = values + p * bh * bw;
    for (int64_t j0 = 0; j0 < bw; j0 += 16) {
      copy8(a_stage[warp] + arow * 16 + acol, x + xb * K + kbase + j0 + acol, xb < B, vec_x);
      __syncwarp();
      wmma::load_matrix_sync(a, reinterpret_cast<const W*>(a_stage[warp]), 16);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        wmma::load_matrix_sync(b, reinterpret_cast<const W*>(vblock + (i0 + 16 * f) * bw + j0),
                               static_cast<unsigned>(bw));
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
      __syncwarp();
    }
  }
#pragma unroll
  for (int f = 0; f < NF; ++f)
    wmma::store_matrix_sync(c_stage[warp] + 16 * f, acc[f], 16 * NF, wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < 16 * 16 * NF; e += 32) {
    const int rr = e / (16 * NF), cc = e % (16 * NF);
    const int64_t bb = xrow0 + rr, row = r * bh + i0 + cc;
    if (bb < B) {
      const float add = bias != nullptr ? static_cast<float>(bias[row]) : 0.0f;
      y[bb * N + row] = static_cast<T>(activate(c_stage[warp][e] + add, act));
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Dense-product semantics for non-finite x (mirror of the CPU's poison_nonfinite)
// ---------------------------------------------------------------------------------------------

// Block b: if batch row b of x holds NaN/Inf, every output block row that does not store all of
// the non-finite entries gets NaN (0 * Inf in the dense product); an all-finite row costs one read.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    poison_nonfinite_kernel(const T* __restrict__ x, const int64_t* __restrict__ crow,
                            const int64_t* __restrict__ col, T* __restrict__ y, int64_t K, int64_t N, int64_t bh,
                            int64_t bw, int64_t n_brows) {
  const int64_t b = blockIdx.x;
  const T* xr = x + b * K;
  int local = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) local += nonfinite(xr[k]);
  if (!__syncthreads_or(local)) return;
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, local);
  __syncthreads();
  const int all = total;
  const T nan = static_cast<T>(NAN);
  for (int64_t r = threadIdx.x; r < n_brows; r += blockDim.x) {
    int stored = 0;
    for (int64_t p = crow[r]; p < crow[r + 1]; ++p)
      for (int64_t j = 0; j < bw; ++j) stored += nonfinite(xr[col[p] * bw + j]);
    if (stored < all)
      for (int64_t i = 0; i < bh; ++i) y[b * N + r * bh + i] = nan;
  }
}

// ---------------------------------------------------------------------------------------------
// sddmm
// ---------------------------------------------------------------------------------------------

// One warp per stored entry p: out[s * split_stride + p] = sum over the batch range of split s of
// aT[row(p), b] * cT[col[p], b]; aT (N, B), cT (K, B) feature-major, read with 16-byte loads when
// `vec` (rows 16-byte aligned).
template <typename T, typename OutT>
__global__ void __launch_bounds__(kThreads)
    csr_sddmm_kernel(const T* __restrict__ aT, const T* __restrict__ cT, const int64_t* __restrict__ crow,
                     const int64_t* __restrict__ col, OutT* __restrict__ out, int64_t B, int64_t n_rows, int64_t nnz,
                     int64_t b_chunk, int64_t split_stride, bool vec) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T) >= 1 ? 16 / sizeof(T) : 1;
  const int lane = threadIdx.x % 32;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (p >= nnz) return;  // uniform per warp
  const int64_t s = blockIdx.y;
  const T* ar = aT + row_of(crow, n_rows, p) * B;
  const T* cr = cT + col[p] * B;
  const int64_t lo = s * b_chunk, hi = imin(B, lo + b_chunk);
  int64_t head = hi, body_end = hi;
  if (vec) {
    head = imin(hi, (lo + V - 1) / V * V);
    body_end = head + (hi - head) / V * V;
  }
  A acc = A(0);
  for (int64_t b = lo + lane; b < head; b += 32) acc += static_cast<A>(ar[b]) * static_cast<A>(cr[b]);
  for (int64_t b = head + lane * V; b < body_end; b += 32 * V) {
    alignas(16) T av[V];
    alignas(16) T cv[V];
    *reinterpret_cast<uint4*>(av) = *reinterpret_cast<const uint4*>(ar + b);
    *reinterpret_cast<uint4*>(cv) = *reinterpret_cast<const uint4*>(cr + b);
#pragma unroll
    for (int e = 0; e < V; ++e) acc += static_cast<A>(av[e]) * static_cast<A>(cv[e]);
  }
  for (int64_t b = body_end + lane; b < hi; b += 32) acc += static_cast<A>(ar[b]) * static_cast<A>(cr[b]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) out[s * split_stride + p] = static_cast<OutT>(acc);
}

// Grid (nnz, S, ceil(bh/32) * ceil(bw/32)): a 32 x 32 tile of stored block p summed over the batch
// range of split s in chunks of 32 rows staged in shared memory; each thread owns 2 x 2 entries.
template <typename T, typename OutT>
__global__ void __launch_bounds__(kThreads)
    bsr_sddmm_kernel(const T* __restrict__ a, const T* __restrict__ c, const int64_t* __restrict__ crow,
                     const int64_t* __restrict__ col, OutT* __restrict__ out, int64_t B, int64_t N, int64_t K,
                     int64_t bh, int64_t bw, int64_t n_brows, int64_t b_chunk, int64_t split_stride) {
  using A = acc_t<T>;
  __shared__ A as[32][33];
  __shared__ A cs[32][33];
  const int64_t p = blockIdx.x, s = blockIdx.y;
  const int64_t n_zj = (bw + 31) / 32;
  const int64_t i0 = (blockIdx.z / n_zj) * 32, j0 = (blockIdx.z % n_zj) * 32;
  const int64_t arow = row_of(crow, n_brows, p) * bh + i0, ccol = col[p] * bw + j0;
  const int iw = static_cast<int>(imin(32, bh - i0)), jw = static_cast<int>(imin(32, bw - j0));
  const int t = threadIdx.x, ti = t % 16, tj = t / 16;
  const int64_t lo = s * b_chunk, hi = imin(B, lo + b_chunk);
  A acc[2][2] = {};
  for (int64_t b0 = lo; b0 < hi; b0 += 32) {
    for (int e = t; e < 32 * 32; e += kThreads) {
      const int bb = e / 32, q = e % 32;
      const bool ok = b0 + bb < hi;
      as[bb][q] = ok && q < iw ? static_cast<A>(a[(b0 + bb) * N + arow + q]) : A(0);
      cs[bb][q] = ok && q < jw ? static_cast<A>(c[(b0 + bb) * K + ccol + q]) : A(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int bb = 0; bb < 32; ++bb) {
      const A a0 = as[bb][ti], a1 = as[bb][ti + 16], c0 = cs[bb][tj], c1 = cs[bb][tj + 16];
      acc[0][0] += a0 * c0;
      acc[0][1] += a0 * c1;
      acc[1][0] += a1 * c0;
      acc[1][1] += a1 * c1;
    }
    __syncthreads();
  }
  OutT* o = out + s * split_stride + p * bh * bw;
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int64_t i = i0 + ti + 16 * u, j = j0 + tj + 16 * v;
      if (i < bh && j < bw) o[i * bw + j] = static_cast<OutT>(acc[u][v]);
    }
}

// Tensor cores, fp16/bf16, bh and bw multiples of 16. Grid (nnz, S, ceil(bh/64) * ceil(bw/64)),
// one warp per 16-row slice of the block's 64 x 64 tile, each with up to four 16 x 16 accumulators
// along the columns. Per 16 batch rows: the (16 x up to 64) slab of c is staged once for the block,
// each warp stages its (16 x 16) slab of a (read col-major as A = a^T), all with 16-byte loads.
template <typename T, typename OutT>
__global__ void __launch_bounds__(kWarps * 32)
    bsr_sddmm_wmma_kernel(const T* __restrict__ a, const T* __restrict__ c, const int64_t* __restrict__ crow,
                          const int64_t* __restrict__ col, OutT* __restrict__ out, int64_t B, int64_t N, int64_t K,
                          int64_t bh, int64_t bw, int64_t n_brows, int64_t b_chunk, int64_t split_stride, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using namespace nvcuda;
  using W = typename CudaType<T>::type;
  __shared__ __align__(32) T a_stage[kWarps][16 * 16];
  __shared__ __align__(32) T c_stage[16 * 64];
  __shared__ __align__(32) float o_stage[kWarps][16 * 16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t p = blockIdx.x, s = blockIdx.y;
  const int64_t n_zj = (bw + 63) / 64;
  const int64_t i0 = (blockIdx.z / n_zj) * 64 + warp * 16, j0 = (blockIdx.z % n_zj) * 64;
  const int nfj = static_cast<int>(imin(4, (bw - j0) / 16));
  const bool active = i0 < imin(bh, (blockIdx.z / n_zj) * 64 + 64);
  const int64_t arow = row_of(crow, n_brows, p) * bh + i0, ccol = col[p] * bw + j0;
  const int64_t lo = s * b_chunk, hi = imin(B, lo + b_chunk);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.0f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::col_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb;
  for (int64_t b0 = lo; b0 < hi; b0 += 16) {
    for (int e = threadIdx.x; e < 16 * nfj * 2; e += blockDim.x) {
      const int rr = e / (nfj * 2), q = e % (nfj * 2);
      copy8(c_stage + rr * 64 + q * 8, c + (b0 + rr) * K + ccol + q * 8, b0 + rr < hi, vec);
    }
    if (active) {
      const int rr = lane / 2, q = lane % 2;
      copy8(a_stage[warp] + rr * 16 + q * 8, a + (b0 + rr) * N + arow + q * 8, b0 + rr < hi, vec);
    }
    __syncthreads();
    if (active) {
      wmma::load_matrix_sync(fa, reinterpret_cast<const W*>(a_stage[warp]), 16);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        if (f < nfj) {
          wmma::load_matrix_sync(fb, reinterpret_cast<const W*>(c_stage + 16 * f), 64);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
    }
    __syncthreads();
  }
  if (!active) return;
  OutT* o = out + s * split_stride + p * bh * bw;
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    if (f >= nfj) continue;
    wmma::store_matrix_sync(o_stage[warp], acc[f], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32)
      o[(i0 + e / 16) * bw + j0 + 16 * f + e % 16] = static_cast<OutT>(o_stage[warp][e]);
    __syncwarp();
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename F>
void with_tile(int bt, F&& f) {
  switch (bt) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <typename F>
void with_fragments(int nf, F&& f) {
  switch (nf) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An attribute of the current device, cached per device (the kernels' launch heuristics read
// them on every call).
int device_attribute(cudaDeviceAttr attr) {
  constexpr int kMaxDevices = 64;
  static int sms[kMaxDevices] = {}, major[kMaxDevices] = {};
  const int dev = c10::cuda::current_device();
  TORCH_CHECK(dev < kMaxDevices, "device index ", dev, " is out of range");
  int* cache = attr == cudaDevAttrMultiProcessorCount ? sms : major;
  if (cache[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev], attr, dev));
  return cache[dev];
}

int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// WMMA on 16-bit types (bf16 included) needs sm_80 or newer.
bool tensor_cores() { return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_cuda_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16 on CUDA, got ", s);
}

template <typename T>
void launch_csr_spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                     const T* bias, Activation act, at::Tensor& y, cudaStream_t stream) {
  const int64_t B = x.size(0), K = x.size(1), N = y.size(1), nnz = col.size(0);
  // Batch tile: as wide as the shared-memory budget and the batch allow.
  int bt = 8;
  while (bt > 1 && (K * bt * static_cast<int64_t>(sizeof(T)) > kTileBytes || bt > B)) bt /= 2;
  const bool smem = K * static_cast<int64_t>(sizeof(T)) * bt <= kTileBytes;
  if (!smem) bt = 4;
  // Lanes per row: about one 16-byte load of values per lane per row on average.
  const int64_t per_lane = std::max<int64_t>(1, 16 / static_cast<int64_t>(sizeof(T)));
  const int64_t mean = N > 0 ? nnz / N : 0;
  int vs = 1;
  while (vs < 32 && vs * per_lane < mean) vs *= 2;
  const int64_t tiles = ceil_div(B, bt);
  // Row splits: enough thread blocks to fill the device, each with a few rows per group of lanes.
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * sm_count(), tiles), 1,
                                             std::max<int64_t>(1, N / (kThreads / vs)));
  TORCH_CHECK(splits <= 65535, "too many row splits");
  const bool vec_x = aligned(x.data_ptr(), 16) && (K * sizeof(T)) % 16 == 0;
  const bool vec_v = aligned(values.data_ptr(), 16) && aligned(col.data_ptr(), 16);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  with_tile(bt, [&](auto tag) {
    constexpr int BT = decltype(tag)::value;
    auto run = [&](auto kernel, size_t bytes) {
      if (bytes > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)));
      kernel<<<grid, kThreads, bytes, stream>>>(x.data_ptr<T>(), values.data_ptr<T>(), crow.data_ptr<int64_t>(),
                                                col.data_ptr<int64_t>(), bias, y.data_ptr<T>(), B, K, N, vs,
                                                vec_x, vec_v, act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (smem) run(csr_spmm_kernel<T, BT, true>, static_cast<size_t>(K) * BT * sizeof(T));
    else if constexpr (BT == 4) run(csr_spmm_kernel<T, 4, false>, 0);
  });
}

template <typename T>
void launch_bsr_spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                     const T* bias, Activation act, int64_t bh, int64_t bw, at::Tensor& y, cudaStream_t stream) {
  const int64_t B = x.size(0), K = x.size(1), N = y.size(1), n_brows = crow.size(0) - 1;
  const int64_t b_tiles = ceil_div(B, kTB);
  TORCH_CHECK(b_tiles <= 65535, "batch of ", B, " rows is too large for one launch");
  const bool wmma = kHalfType<T> && bh % 16 == 0 && bw % 16 == 0 && aligned(values.data_ptr(), 32) && tensor_cores();
  if constexpr (kHalfType<T>) {
    if (wmma) {
      const int64_t slices = bh / 16;
      const int nf = slices % 4 == 0 ? 4 : (slices % 2 == 0 ? 2 : 1);
      const bool vec_x = aligned(x.data_ptr(), 16);
      with_fragments(nf, [&](auto tag) {
        constexpr int NF = decltype(tag)::value;
        const dim3 grid(static_cast<unsigned>(n_brows), static_cast<unsigned>(ceil_div(B, kWarps * 16)),
                        static_cast<unsigned>(slices / NF));
        bsr_spmm_wmma_kernel<T, NF><<<grid, kWarps * 32, 0, stream>>>(
            x.data_ptr<T>(), values.data_ptr<T>(), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), bias,
            y.data_ptr<T>(), B, K, N, bh, bw, vec_x, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      return;
    }
  }
  const dim3 grid(static_cast<unsigned>(n_brows), static_cast<unsigned>(b_tiles),
                  static_cast<unsigned>(ceil_div(bh, kTI)));
  bsr_spmm_kernel<T><<<grid, kThreads, 0, stream>>>(x.data_ptr<T>(), values.data_ptr<T>(), crow.data_ptr<int64_t>(),
                                                    col.data_ptr<int64_t>(), bias, y.data_ptr<T>(), B, K, N, bh, bw,
                                                    act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// How many batch ranges an sddmm over `items` programs splits into to fill the device.
int64_t batch_splits(int64_t items, int64_t B) {
  const int64_t target = 4 * sm_count();
  if (items >= target || B <= 1024) return 1;
  return std::clamp<int64_t>(ceil_div(target, std::max<int64_t>(items, 1)), 1, imin(65535, B / 512));
}

template <typename T, typename OutT>
void launch_sddmm(const at::Tensor& a, const at::Tensor& c, const at::Tensor& crow, const at::Tensor& col,
                  int64_t bh, int64_t bw, int64_t splits, OutT* out, int64_t split_stride, cudaStream_t stream) {
  const int64_t B = a.size(0), N = a.size(1), K = c.size(1), nnz = col.size(0), n_brows = crow.size(0) - 1;
  const int64_t b_chunk = ceil_div(B, splits);
  if (bh == 1 && bw == 1) {
    const at::Tensor aT = a.t().contiguous(), cT = c.t().contiguous();
    const bool vec = aligned(aT.data_ptr(), 16) && aligned(cT.data_ptr(), 16) && (B * sizeof(T)) % 16 == 0;
    constexpr int warps = kThreads / 32;
    const dim3 grid(static_cast<unsigned>(ceil_div(nnz, warps)), static_cast<unsigned>(splits));
    csr_sddmm_kernel<T, OutT><<<grid, kThreads, 0, stream>>>(aT.data_ptr<T>(), cT.data_ptr<T>(),
                                                             crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), out,
                                                             B, n_brows, nnz, b_chunk, split_stride, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if constexpr (kHalfType<T>) {
    if (bh % 16 == 0 && bw % 16 == 0 && tensor_cores()) {
      const bool vec = aligned(a.data_ptr(), 16) && aligned(c.data_ptr(), 16);
      const dim3 grid(static_cast<unsigned>(nnz), static_cast<unsigned>(splits),
                      static_cast<unsigned>(ceil_div(bh, 64) * ceil_div(bw, 64)));
      const int warps = static_cast<int>(imin(kWarps, bh / 16));
      bsr_sddmm_wmma_kernel<T, OutT><<<grid, warps * 32, 0, stream>>>(
          a.data_ptr<T>(), c.data_ptr<T>(), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), out, B, N, K, bh, bw,
          n_brows, b_chunk, split_stride, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 grid(static_cast<unsigned>(nnz), static_cast<unsigned>(splits),
                  static_cast<unsigned>(ceil_div(bh, 32) * ceil_div(bw, 32)));
  bsr_sddmm_kernel<T, OutT><<<grid, kThreads, 0, stream>>>(a.data_ptr<T>(), c.data_ptr<T>(), crow.data_ptr<int64_t>(),
                                                           col.data_ptr<int64_t>(), out, B, N, K, bh, bw, n_brows,
                                                           b_chunk, split_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor bsr_spmm(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& crow_in,
                    const at::Tensor& col_in, const c10::optional<at::Tensor>& bias, std::string_view activation) {
  check_spmm_args(x_in, values_in, crow_in, col_in, bias);
  CHECK_DEVICE_TYPE(x_in, at::kCUDA);
  check_cuda_dtype(x_in, "x");
  const Activation act = parse_activation(activation);
  const auto bs = block_shape_of(values_in);
  TORCH_CHECK(x_in.size(1) % bs.bw == 0, "x has ", x_in.size(1), " features, not a multiple of the block width ",
              bs.bw);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = (crow.size(0) - 1) * bs.bh;
  at::Tensor y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsr_spmm_cuda", [&] {
    const scalar_t* bp = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
    if (bs.bh == 1 && bs.bw == 1) {
      launch_csr_spmm<scalar_t>(x, values, crow, col, bp, act, y, stream);
    } else {
      launch_bsr_spmm<scalar_t>(x, values, crow, col, bp, act, bs.bh, bs.bw, y, stream);
    }
    poison_nonfinite_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), y.data_ptr<scalar_t>(), K, N,
        bs.bh, bs.bw, crow.size(0) - 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor bsr_spmm_t(const at::Tensor& g, const at::Tensor& values, const at::Tensor& crow_t,
                      const at::Tensor& col_t, const at::Tensor& perm) {
  CHECK_DIM(g, 2);
  CHECK_INDEX(perm);
  CHECK_DEVICE_TYPE(g, at::kCUDA);
  CHECK_SAME_DEVICE(g, values);
  CHECK_SAME_DEVICE(g, perm);
  TORCH_CHECK(perm.size(0) == values.size(0), "perm holds ", perm.size(0), " entries for ", values.size(0),
              " stored blocks");
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor values_t = values.index_select(0, perm);
  if (values_t.dim() == 3) values_t = values_t.transpose(1, 2).contiguous();
  return bsr_spmm(g, values_t, crow_t, col_t, c10::nullopt, "identity");
}

at::Tensor bsr_sddmm(const at::Tensor& a_in, const at::Tensor& c_in, const at::Tensor& crow_in,
                     const at::Tensor& col_in, int64_t bh, int64_t bw) {
  CHECK_DIM(a_in, 2);
  CHECK_DIM(c_in, 2);
  CHECK_INDEX(crow_in);
  CHECK_INDEX(col_in);
  CHECK_SAME_DTYPE(a_in, c_in);
  CHECK_DEVICE_TYPE(a_in, at::kCUDA);
  CHECK_SAME_DEVICE(a_in, c_in);
  CHECK_SAME_DEVICE(a_in, crow_in);
  CHECK_SAME_DEVICE(a_in, col_in);
  check_cuda_dtype(a_in, "a");
  TORCH_CHECK(a_in.size(0) == c_in.size(0), "a and c must share the batch size, got ", a_in.size(0), " and ",
              c_in.size(0));
  TORCH_CHECK(bh >= 1 && bw >= 1, "block sizes must be positive, got ", bh, "x", bw);
  TORCH_CHECK(crow_in.size(0) >= 1, "crow must hold at least one entry");
  TORCH_CHECK(a_in.size(1) == (crow_in.size(0) - 1) * bh, "a has ", a_in.size(1), " columns but the pattern has ",
              (crow_in.size(0) - 1) * bh, " rows");
  TORCH_CHECK(c_in.size(1) % bw == 0, "c has ", c_in.size(1), " columns, not a multiple of the block width ", bw);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const int64_t nnz = col_in.size(0), B = a_in.size(0);
  at::Tensor out = (bh == 1 && bw == 1) ? at::empty({nnz}, a_in.options()) : at::empty({nnz, bh, bw}, a_in.options());
  if (nnz == 0) return out;
  const at::Tensor a = a_in.contiguous(), c = c_in.contiguous();
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  const cudaStream_t stream = current_stream();
  const int64_t items = (bh == 1 && bw == 1) ? ceil_div(nnz, kThreads / 32) : nnz * ceil_div(bh, 32) * ceil_div(bw, 32);
  const int64_t splits = batch_splits(items, B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "bsr_sddmm_cuda", [&] {
    using A = acc_t<scalar_t>;
    if (splits == 1) {
      launch_sddmm<scalar_t, scalar_t>(a, c, crow, col, bh, bw, 1, out.data_ptr<scalar_t>(), 0, stream);
    } else {
      // Partial sums side by side in the accumulator's dtype, added in a fixed order afterwards.
      at::Tensor partial = at::empty({splits, out.numel()}, a.options().dtype(c10::CppTypeToScalarType<A>::value));
      launch_sddmm<scalar_t, A>(a, c, crow, col, bh, bw, splits, partial.data_ptr<A>(), out.numel(), stream);
      out.copy_(partial.sum(0).view(out.sizes()));
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparseode, CUDA, m) {
  m.impl("bsr_spmm", &bsr_spmm);
  m.impl("bsr_spmm_t", &bsr_spmm_t);
  m.impl("bsr_sddmm", &bsr_sddmm);
}

}  // namespace sparseode::cuda
