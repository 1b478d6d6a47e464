// CUDA spmm entry points (spmm_cuda.h), the mirror of csrc/cpu/spmm_cpu.cpp:
//
//   bsr_spmm     CSR: rows split over thread blocks by stored entries (binary search on crow), rows
//                handed to groups of lanes sized by the mean row length through a shared counter, a
//                batch tile of x held feature-major in shared memory, 16-byte loads.
//                BSR: tensor cores (WMMA, fp16/bf16, blocks multiple of 16), else a shared-memory
//                tiled kernel (fp32/fp64, other blocks). Fused bias + activation epilogue.
//   bsr_spmm_fm  the same feature-major: its own kernel, in spmm_fm_cuda.cu.
//   bsr_spmm_t   as on the CPU: the values gathered through `perm` (blocks transposed), then bsr_spmm
//                on the transposed pattern.
//   NaN/Inf in x get the dense product's semantics, as on the CPU (nonfinite.cuh): the CSR kernel
//   flags them while staging x, the other paths by one detect pass.
#include "cuda_common.cuh"  // first: it sets up the c10/cuda headers
#include "nonfinite.cuh"
#include "spmm_cuda.h"
#include "spmm_kernels.cuh"

namespace sparseode::cuda {
namespace {

// Returns true when the kernel staged all of x and so set `flags` itself.
template <typename T>
bool launch_csr_spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                     const T* bias, Activation act, at::Tensor& y, int* flags, cudaStream_t stream) {
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
                                             std::clamp<int64_t>(N / (kThreads / vs), 1, 65535));
  const bool vec_x = aligned(x.data_ptr(), 16) && (K * sizeof(T)) % 16 == 0;
  const bool vec_v = aligned(values.data_ptr(), 16) && aligned(col.data_ptr(), 16);
  const dim3 grid = checked_grid("csr_spmm", tiles, splits);
  with_tile(bt, [&](auto tag) {
    constexpr int BT = decltype(tag)::value;
    auto run = [&](auto kernel, size_t bytes, int* kernel_flags) {
      if (bytes > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)));
      kernel<<<grid, kThreads, bytes, stream>>>(x.data_ptr<T>(), values.data_ptr<T>(), crow.data_ptr<int64_t>(),
                                                col.data_ptr<int64_t>(), bias, y.data_ptr<T>(), B, K, N, vs,
                                                vec_x, vec_v, act, kernel_flags);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (smem) run(csr_spmm_kernel<T, BT, true>, static_cast<size_t>(K) * BT * sizeof(T), flags);
    else if constexpr (BT == 4) run(csr_spmm_kernel<T, 4, false>, 0, nullptr);
  });
  return smem;
}

template <typename T>
void launch_bsr_spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                     const T* bias, Activation act, int64_t bh, int64_t bw, at::Tensor& y, cudaStream_t stream) {
  const int64_t B = x.size(0), K = x.size(1), N = y.size(1), n_brows = crow.size(0) - 1;
  const int64_t b_tiles = ceil_div(B, kTB);
  const bool wmma = kHalfType<T> && bh % 16 == 0 && bw % 16 == 0 && aligned(values.data_ptr(), 32) && tensor_cores();
  if constexpr (kHalfType<T>) {
    if (wmma) {
      const int64_t slices = bh / 16;
      const int nf = slices % 4 == 0 ? 4 : (slices % 2 == 0 ? 2 : 1);
      const bool vec_x = aligned(x.data_ptr(), 16);
      with_fragments(nf, [&](auto tag) {
        constexpr int NF = decltype(tag)::value;
        const dim3 grid = checked_grid("bsr_spmm_wmma", n_brows, ceil_div(B, kWarps * 16), slices / NF);
        bsr_spmm_wmma_kernel<T, NF><<<grid, kWarps * 32, 0, stream>>>(
            x.data_ptr<T>(), values.data_ptr<T>(), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), bias,
            y.data_ptr<T>(), B, K, N, bh, bw, vec_x, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      return;
    }
  }
  const dim3 grid = checked_grid("bsr_spmm", n_brows, b_tiles, ceil_div(bh, kTI));
  bsr_spmm_kernel<T><<<grid, kThreads, 0, stream>>>(x.data_ptr<T>(), values.data_ptr<T>(), crow.data_ptr<int64_t>(),
                                                    col.data_ptr<int64_t>(), bias, y.data_ptr<T>(), B, K, N, bh, bw,
                                                    act);
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
  const at::Tensor flags = nonfinite_flags(x, B);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsr_spmm_cuda", [&] {
    const scalar_t* bp = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
    bool flagged = false;
    if (bs.bh == 1 && bs.bw == 1) {
      flagged = launch_csr_spmm<scalar_t>(x, values, crow, col, bp, act, y, flags.data_ptr<int>(), stream);
    } else {
      launch_bsr_spmm<scalar_t>(x, values, crow, col, bp, act, bs.bh, bs.bw, y, stream);
    }
    if (!flagged) detect_nonfinite<scalar_t>(x.data_ptr<scalar_t>(), B, K, false, flags.data_ptr<int>(), stream);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    poison_nonfinite<scalar_t>(xp, Strides{K, 1}, flags.data_ptr<int>(), crow, col, yp, Strides{N, 1}, B, K, bs.bh,
                               bs.bw, stream);
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


}  // namespace sparseode::cuda
