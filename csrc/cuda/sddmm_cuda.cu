// CUDA sddmm entry point (spmm_cuda.h): CSR one warp per stored entry over the feature-major
// operands; BSR tensor cores (fp16/bf16) or a tiled kernel per stored block; a long batch over few
// blocks is split into partial sums that are added afterwards (deterministic, no atomics).
#include "cuda_common.cuh"  // first: it sets up the c10/cuda headers
#include "spmm_cuda.h"

namespace sparseode::cuda {
namespace {

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
    const dim3 grid = checked_grid("csr_sddmm", ceil_div(nnz, warps), splits);
    csr_sddmm_kernel<T, OutT><<<grid, kThreads, 0, stream>>>(aT.data_ptr<T>(), cT.data_ptr<T>(),
                                                             crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), out,
                                                             B, n_brows, nnz, b_chunk, split_stride, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if constexpr (kHalfType<T>) {
    if (bh % 16 == 0 && bw % 16 == 0 && tensor_cores()) {
      const bool vec = aligned(a.data_ptr(), 16) && aligned(c.data_ptr(), 16);
      const dim3 grid = checked_grid("bsr_sddmm_wmma", nnz, splits, ceil_div(bh, 64) * ceil_div(bw, 64));
      const int warps = static_cast<int>(imin(kWarps, bh / 16));
      bsr_sddmm_wmma_kernel<T, OutT><<<grid, warps * 32, 0, stream>>>(
          a.data_ptr<T>(), c.data_ptr<T>(), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), out, B, N, K, bh, bw,
          n_brows, b_chunk, split_stride, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 grid = checked_grid("bsr_sddmm", nnz, splits, ceil_div(bh, 32) * ceil_div(bw, 32));
  bsr_sddmm_kernel<T, OutT><<<grid, kThreads, 0, stream>>>(a.data_ptr<T>(), c.data_ptr<T>(), crow.data_ptr<int64_t>(),
                                                           col.data_ptr<int64_t>(), out, B, N, K, bh, bw, n_brows,
                                                           b_chunk, split_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


}  // namespace

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

}  // namespace sparseode::cuda
