// Shared by the CUDA kernels of sparseode (spmm_cuda.cu, sddmm_cuda.cu): includes, accumulator and
// half types, device helpers (activations, row search, vector loads, batch-tile staging) and host
// helpers (device attributes, the current stream, checked launch grids).
//
// Every launch runs on the current stream of the inputs' device, under a device guard, on a grid
// checked by checked_grid(), and is followed by C10_CUDA_KERNEL_LAUNCH_CHECK(). Nothing synchronises
// with the host, so the ops can be captured in CUDA graphs. The stream comes from
// c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is that same function re-exported by
// ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE headers: these files compile with the
// CUDA runtime headers alone). Index arithmetic on global memory is int64 throughout (sizes are
// passed as int64_t; block-local counters stay int).
// A CPU-only torch (the CI compile check) ships c10/cuda headers without the configure-generated
// one; it only carries Windows export switches, so without it the defaults are right.
#pragma once

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
constexpr int kWarps = 4;  // warps per thread block (tensor-core kernels)
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
// Sets flags[b0 + b] to 1 when row b holds NaN/Inf (the staging reads all of the row anyway, so
// the non-finite check of nonfinite.cuh costs no extra read of x); flags may be null.
template <typename T, int BT>
__device__ void load_x_tile(const T* __restrict__ x, int64_t K, int64_t b0, int nb, bool vec, T* __restrict__ xs,
                            int* __restrict__ flags) {
  constexpr int V = 16 / sizeof(T);
  unsigned bad = 0;  // bit b: row b holds NaN/Inf (a register, not an indexed local array)
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
      for (int e = 0; e < V; ++e) {
        xs[(k + e) * BT + b] = v[e];
        bad |= static_cast<unsigned>(nonfinite(v[e])) << b;
      }
    }
  } else {
    for (int64_t q = threadIdx.x; q < K * BT; q += blockDim.x) {
      const int b = static_cast<int>(q / K);
      const int64_t k = q % K;
      const T v = b < nb ? x[(b0 + b) * K + k] : T(0);
      xs[k * BT + b] = v;
      bad |= static_cast<unsigned>(nonfinite(v)) << b;
    }
  }
  if (flags != nullptr && bad != 0) {  // rare: only threads that saw NaN/Inf write
#pragma unroll
    for (int b = 0; b < BT; ++b)
      if (bad >> b & 1u) atomicOr(flags + b0 + b, 1);
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
// Host helpers
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


// A launch grid checked against CUDA's limits (2^31 - 1 blocks along x, 65,535 along y and z), so an
// oversized problem is a clear error naming the kernel instead of a failed or partial launch.
inline dim3 checked_grid(const char* kernel, int64_t x, int64_t y = 1, int64_t z = 1) {
  TORCH_CHECK(x >= 1 && x <= 2147483647 && y >= 1 && y <= 65535 && z >= 1 && z <= 65535, kernel,
              ": launch grid (", x, ", ", y, ", ", z, ") is outside CUDA's limits (2^31 - 1, 65535, 65535); ",
              "split the batch into smaller chunks");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

}  // namespace
}  // namespace sparseode::cuda
