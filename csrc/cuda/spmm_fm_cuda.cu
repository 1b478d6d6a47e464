// CUDA bsr_spmm_fm (spmm_cuda.h), the mirror of the CPU's feature-major walk (spmm_fm_tiles in
// csrc/cpu/spmm_kernels.h): xT (K, B) -> yT (N, B) with no transposes. The batch is contiguous, so
// one warp per output row reads a 32 * kFmCols-wide slab of each stored input row with coalesced
// loads; a row of a BSR weight is row i of its block row, so CSR (1x1 blocks) and BSR share the
// kernel. Bias and activation apply to columns [0, act_cols) only (the others carry tangent
// directions). NaN/Inf in xT get the dense product's semantics through nonfinite.cuh.
#include "cuda_common.cuh"  // first: it sets up the c10/cuda headers
#include "nonfinite.cuh"
#include "spmm_cuda.h"

namespace sparseode::cuda {
namespace {

constexpr int kFmCols = 4;  // batch columns per lane: a warp covers 128 columns
constexpr int kFmRows = kThreads / 32;  // output rows (warps) per thread block

// Grid (ceil(N / kFmRows), ceil(B / (32 kFmCols))): warp w of block (x, y) computes output row
// x * kFmRows + w for the columns c0 + lane + 32 v (v < kFmCols), c0 = y * 32 * kFmCols. The row's
// stored entries (block p of its block row, column j of the block) are read 32 at a time, one per
// lane, and broadcast to the warp with shuffles.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    spmm_fm_kernel(const T* __restrict__ xT, const T* __restrict__ values, const int64_t* __restrict__ crow,
                   const int64_t* __restrict__ col, const T* __restrict__ bias, T* __restrict__ yT, int64_t B,
                   int64_t N, int64_t bh, int64_t bw, int64_t act_cols, Activation act) {
  using A = acc_t<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFmRows + warp;
  if (row >= N) return;  // uniform per warp
  const int64_t r = row / bh, i = row % bh;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * 32 * kFmCols + lane;
  const int64_t p0 = crow[r], n_entries = (crow[r + 1] - p0) * bw;
  A acc[kFmCols];
#pragma unroll
  for (int v = 0; v < kFmCols; ++v) acc[v] = A(0);
  for (int64_t e0 = 0; e0 < n_entries; e0 += 32) {
    A w = A(0);
    int64_t k = 0;
    if (e0 + lane < n_entries) {
      const int64_t p = p0 + (e0 + lane) / bw, j = (e0 + lane) % bw;
      w = static_cast<A>(values[(p * bh + i) * bw + j]);
      k = col[p] * bw + j;
    }
    const int count = static_cast<int>(imin(32, n_entries - e0));
    for (int q = 0; q < count; ++q) {
      const A wq = __shfl_sync(0xffffffffu, w, q);
      const T* xr = xT + __shfl_sync(0xffffffffu, k, q) * B;
#pragma unroll
      for (int v = 0; v < kFmCols; ++v) {
        const int64_t b = c0 + 32 * v;
        if (b < B) acc[v] += wq * static_cast<A>(xr[b]);
      }
    }
  }
  const A add = bias != nullptr ? static_cast<A>(bias[row]) : A(0);
#pragma unroll
  for (int v = 0; v < kFmCols; ++v) {
    const int64_t b = c0 + 32 * v;
    if (b < B) yT[row * B + b] = static_cast<T>(b < act_cols ? activate(acc[v] + add, act) : acc[v]);
  }
}

}  // namespace

at::Tensor bsr_spmm_fm(const at::Tensor& xT_in, const at::Tensor& values_in, const at::Tensor& crow_in,
                       const at::Tensor& col_in, const c10::optional<at::Tensor>& bias, std::string_view activation,
                       int64_t act_cols) {
  // xT (K, B) is checked as spmm's x (B', K') with B' = K: the pattern checks do not read the batch
  check_spmm_args(xT_in, values_in, crow_in, col_in, bias);
  CHECK_DEVICE_TYPE(xT_in, at::kCUDA);
  check_cuda_dtype(xT_in, "xT");
  TORCH_CHECK(act_cols >= 0, "act_cols must be >= 0, got ", act_cols);
  const Activation act = parse_activation(activation);  // a bad name is an error even when no column takes it
  const auto bs = block_shape_of(values_in);
  TORCH_CHECK(xT_in.size(0) % bs.bw == 0, "xT has ", xT_in.size(0), " features, not a multiple of the block width ",
              bs.bw);
  const c10::cuda::CUDAGuard guard(xT_in.device());
  const at::Tensor xT = xT_in.contiguous(), values = values_in.contiguous();
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  const int64_t K = xT.size(0), B = xT.size(1), N = (crow.size(0) - 1) * bs.bh;
  at::Tensor yT = at::empty({N, B}, xT.options());
  if (B == 0 || N == 0) return yT;
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor flags = nonfinite_flags(xT, B);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xT.scalar_type(), "bsr_spmm_fm_cuda", [&] {
    const dim3 grid = checked_grid("bsr_spmm_fm", ceil_div(N, kFmRows), ceil_div(B, 32 * kFmCols));
    spmm_fm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        xT.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
        bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, yT.data_ptr<scalar_t>(), B, N, bs.bh, bs.bw,
        act_cols, act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    detect_nonfinite<scalar_t>(xT.data_ptr<scalar_t>(), B, K, /*feature_major=*/true, flags.data_ptr<int>(), stream);
    poison_nonfinite<scalar_t>(xT.data_ptr<scalar_t>(), Strides{1, B}, flags.data_ptr<int>(), crow, col,
                               yT.data_ptr<scalar_t>(), Strides{1, B}, B, K, bs.bh, bs.bw, stream);
  });
  return yT;
}

}  // namespace sparseode::cuda
