// Device kernels of spmm (y = act(x W^T + bias)) on CUDA, launched by spmm_cuda.cu: CSR rows split
// over thread blocks by stored entries, BSR on tensor cores (fp16/bf16) or shared-memory tiles. The
// feature-major kernel is in spmm_fm_cuda.cu, the non-finite pass in nonfinite.cuh.
#pragma once

#include "cuda_common.cuh"

namespace sparseode::cuda {
namespace {

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
                    int64_t K, int64_t N, int vs, bool vec_x, bool vec_v, Activation act, int* __restrict__ flags) {
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
  if constexpr (SMEM) load_x_tile<T, BT>(x, K, b0, nb, vec_x, xs, flags);
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

}  // namespace
}  // namespace sparseode::cuda
