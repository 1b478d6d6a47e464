// The fused field's backward op sparseode::mlp_field_backward (formulas in field_backward_kernels.h):
// argument checks, W^T of every layer, the tile width, and the batch split into one chunk of tiles
// per thread, each with its own accumulator of the weight, scale and shift gradients, summed after
// (in chunk order, so a given thread count gives the same bits every run).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../common.h"
#include "field_backward_table.h"
#include "field_cpu.h"

namespace sparseode::cpu {

const FieldBackwardKernels& field_backward_kernels() {
  static const FieldBackwardKernels& chosen = []() -> const FieldBackwardKernels& {
    const std::string name = field_kernels().name;
#if defined(__x86_64__) || defined(__i386__)
    if (name == "avx512") return field_backward_kernels_avx512();
    if (name == "avx2") return field_backward_kernels_avx2();
#endif
    return field_backward_kernels_default();
  }();
  return chosen;
}

namespace {

constexpr int64_t kCsrFields = 5;  // crow, col, crow_t, col_t, perm

// Tile width: a whole number of SIMD registers, at most 4 of them, with the tile's five panels of
// the widest layer within ~L2/2, and small enough that every thread gets a tile.
int64_t backward_tile(int64_t lanes, int64_t elem, int64_t B, int64_t width, int64_t mb) {
  constexpr int64_t kScratchBytes = 512 * 1024;
  const int64_t per_thread = (B + at::get_num_threads() - 1) / at::get_num_threads();
  int64_t tb = lanes;
  while (tb < 4 * lanes && tb < per_thread && width * (3 * (1 + mb) + 2) * (2 * tb) * elem <= kScratchBytes) tb *= 2;
  return tb;
}

struct Args {
  const at::Tensor& z;
  at::TensorList weights;
  at::TensorList patterns;
  const c10::List<std::optional<at::Tensor>>& scales;
  const c10::List<std::optional<at::Tensor>>& shifts;
  at::TensorList saved;
};

void check_like_z(const at::Tensor& z, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), name, " must have z's dtype ", z.scalar_type(), ", got ",
              t.scalar_type());
  CHECK_DEVICE_TYPE(t, at::kCPU);
}

// Per-layer (N, K) (check_field_layers) after checking that saved holds the forward's products for
// m tangents.
std::vector<std::pair<int64_t, int64_t>> check_layers(const Args& a, int64_t m, int64_t trace) {
  const size_t L = a.weights.size();
  TORCH_CHECK(a.saved.size() == L, "saved must hold one entry per layer (", L, "), got ", a.saved.size());
  const auto dims = check_field_layers(a.z, a.weights, a.patterns, a.scales, a.shifts);
  const int64_t B = a.z.size(0);
  for (size_t l = 0; l < L; ++l) {
    const int64_t n = dims[l].first, groups = l + 1 < L ? 1 + m : 1 + (trace > 0);
    CHECK_SAME_DTYPE(a.z, a.saved[l]);
    TORCH_CHECK(a.saved[l].dim() == 3 && a.saved[l].size(0) == n && a.saved[l].size(1) == groups &&
                    a.saved[l].size(2) == B,
                "saved[", l, "] must be the forward's products of shape (", n, ", ", groups, ", ", B, "), got ",
                a.saved[l].sizes());
  }
  return dims;
}

// A layer runs its backward products as GEMMs (FieldBackLayer::dense) when it is at least this wide
// both ways and stores at least this share of its entries. Measured on one core (AVX-512, MKL, the
// backward op of a 2 -> 256x3 field at batch 1000, exact trace; sparse / GEMM path): density 0.2
// 19-25 / 31-33 ms, 0.3 31-33 / 23-30, 0.5 29-31 / 20-21; 2 -> 64x3: 0.3 1.4-1.5 / 1.7-1.9, 0.5
// 1.9-2.0 / 1.7. The sparse rows and dots run at ~15-25 GFLOP/s and a GEMM on a tile's panels at
// ~45-75, so the dense product (all N K entries) wins from about a third of them stored.
constexpr int64_t kGemmMinWidth = 32;
constexpr double kGemmMinDensity = 0.35;

bool gemm_path(int64_t N, int64_t K, int64_t stored) {
  return std::min(N, K) >= kGemmMinWidth && static_cast<double>(stored) >= kGemmMinDensity * N * K;
}

// c = [c +] op(a) op(b) on raw row-major panels (FieldGemm), through ATen's mm (MKL here); called
// from inside the per-thread chunks, where it runs on the calling thread.
template <typename T>
void aten_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t Kc, const T* a, int64_t lda, const T* b,
               int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(ptr), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {M, N}, {ldc, 1}, options);
  const at::Tensor lhs = view(a, M, Kc, lda, trans_a), rhs = view(b, Kc, N, ldb, trans_b);
  if (accumulate) {
    out.addmm_(lhs, rhs);
  } else {
    at::mm_out(out, lhs, rhs);
  }
}

// The (N, K) dense weights of a CSR layer (zeros where it stores nothing).
template <typename T>
const T* densify(const FieldLayer<T>& f, std::vector<at::Tensor>& keep, const at::TensorOptions& options) {
  keep.push_back(at::zeros({f.N, f.K}, options));
  T* dense = keep.back().data_ptr<T>();
  for (int64_t n = 0; n < f.N; ++n)
    for (int64_t p = f.crow[n]; p < f.crow[n + 1]; ++p) dense[n * f.K + f.col[p]] = f.w[p];
  return dense;
}

struct AccSizes {
  int64_t acc = 0;       // a chunk's accumulator: every weight, scale and shift gradient
  int64_t dense_gw = 0;  // a chunk's dense weight gradients of the CSR layers on the GEMM path
};

// The backward's layers (pointers into `keep`, which holds the contiguous copies, the W^T and the
// dense weights of GEMM-path layers) and the sizes of one chunk's accumulators.
template <typename T>
AccSizes make_layers(const Args& a, const std::vector<std::pair<int64_t, int64_t>>& dims, std::vector<at::Tensor>& keep,
                     std::vector<FieldBackLayer<T>>& layers) {
  const auto ptr = [&](const at::Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr<T>();
  };
  const auto index = [&](const at::Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr<int64_t>();
  };
  AccSizes sizes;
  size_t p = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    FieldBackLayer<T>& layer = layers[l];
    FieldLayer<T>& f = layer.fwd;
    f.N = dims[l].first;
    f.K = dims[l].second;
    const at::Tensor& w = a.weights[l];
    const bool gemm = gemm_path(f.N, f.K, w.numel());
    f.w = ptr(w);
    if (w.dim() == 1) {
      f.crow = index(a.patterns[p]);
      f.col = index(a.patterns[p + 1]);
      if (gemm) {
        layer.dense = densify(f, keep, w.options());
        layer.dense_gw = sizes.dense_gw;
        sizes.dense_gw += f.N * f.K;
      } else {
        layer.crow_t = index(a.patterns[p + 2]);
        layer.col_t = index(a.patterns[p + 3]);
        layer.wt = ptr(w.index_select(0, a.patterns[p + 4]));
      }
      p += kCsrFields;
    } else if (gemm) {
      layer.dense = f.w;
    } else {
      layer.wt = ptr(w.t().contiguous());
    }
    const std::optional<at::Tensor> s = a.scales[l], c = a.shifts[l];
    if (s.has_value()) f.scale = ptr(*s);
    if (c.has_value()) f.shift = ptr(*c);
    f.saved = ptr(a.saved[l]);
    f.groups = a.saved[l].size(1);
    layer.gw = sizes.acc;
    sizes.acc += w.numel();
    if (f.scale) {
      layer.gs = sizes.acc;
      sizes.acc += f.N;
    }
    if (f.shift) {
      layer.gc = sizes.acc;
      sizes.acc += f.N;
    }
  }
  return sizes;
}

// acc's weight gradient of every CSR layer on the GEMM path += its dense gradient at the stored positions.
template <typename T>
void gather_dense_grads(const std::vector<FieldBackLayer<T>>& layers, const T* dense_gw, T* acc) {
  for (const auto& layer : layers) {
    const FieldLayer<T>& f = layer.fwd;
    if (!layer.dense || !f.crow || layer.gw < 0) continue;
    const T* g = dense_gw + layer.dense_gw;
    T* out = acc + layer.gw;
    for (int64_t n = 0; n < f.N; ++n)
      for (int64_t p = f.crow[n]; p < f.crow[n + 1]; ++p) out[p] += g[n * f.K + f.col[p]];
  }
}

template <typename T>
at::Tensor run(FieldBackCall<T> call, const std::vector<FieldBackLayer<T>>& layers, const AccSizes& sizes, int64_t width,
               const at::TensorOptions& options) {
  call.TB = backward_tile(field_kernels().lanes<T>(), sizeof(T), call.B, width, call.mb);
  call.PW = (1 + call.mb) * call.TB;
  call.layers = layers.data();
  call.n_layers = static_cast<int64_t>(layers.size());
  const int64_t n_tiles = (call.B + call.TB - 1) / call.TB;
  int64_t work = 0;
  for (const auto& layer : layers) work += 2 * (layer.fwd.crow ? layer.fwd.crow[layer.fwd.N] : layer.fwd.N * layer.fwd.K);
  const bool tiny = work * call.PW * n_tiles < (1 << 16);  // no thread wake-up for a tiny call
  const int64_t chunks = tiny ? 1 : std::min<int64_t>(at::get_num_threads(), n_tiles);
  const int64_t per_chunk = (n_tiles + chunks - 1) / chunks;
  const int64_t acc_size = sizes.acc;
  at::Tensor acc = at::zeros({chunks, acc_size}, options);
  call.gemm = &aten_gemm<T>;
  const auto tiles = field_backward_kernels().of<T>().tiles;
  T* acc_data = acc.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const size_t panel = static_cast<size_t>(width * call.PW), row = static_cast<size_t>(width * call.TB);
    std::vector<T> buf(3 * panel + 2 * row), dense_gw(sizes.dense_gw);
    for (int64_t c = c0; c < c1; ++c) {
      const FieldBackScratch<T> s{buf.data(),
                                  buf.data() + panel,
                                  buf.data() + 2 * panel,
                                  buf.data() + 3 * panel,
                                  buf.data() + 3 * panel + row,
                                  acc_data + c * acc_size,
                                  dense_gw.data()};
      std::fill(dense_gw.begin(), dense_gw.end(), T(0));
      tiles(call, c * per_chunk, std::min(n_tiles, (c + 1) * per_chunk), s);
      gather_dense_grads(layers, dense_gw.data(), s.acc);
    }
  });
  return chunks == 1 ? acc[0] : acc.sum(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
mlp_field_backward(const at::Tensor& z_in, const std::optional<at::Tensor>& probe, at::TensorList weights,
                   at::TensorList patterns, const c10::List<std::optional<at::Tensor>>& scales,
                   const c10::List<std::optional<at::Tensor>>& shifts, at::TensorList saved,
                   const std::optional<at::Tensor>& grad_f, const std::optional<at::Tensor>& grad_trace,
                   std::string_view activation, int64_t trace) {
  CHECK_DIM(z_in, 2);
  CHECK_DEVICE_TYPE(z_in, at::kCPU);
  CHECK_FLOATING(z_in);
  TORCH_CHECK(trace >= 0 && trace <= 2, "trace must be 0 (none), 1 (exact) or 2 (Hutchinson), got ", trace);
  const FieldAct act = parse_field_activation(activation);
  const int64_t B = z_in.size(0), d = z_in.size(1);
  const int64_t m = trace == 1 ? d : (trace == 2 ? 1 : 0);
  const bool with_trace = trace > 0 && grad_trace.has_value();
  at::Tensor e, gf, gtr;
  if (trace == 2) {
    TORCH_CHECK(probe.has_value() && probe->sizes() == z_in.sizes(), "the Hutchinson trace needs a probe of z's shape");
    check_like_z(z_in, *probe, "probe");
    e = probe->contiguous();
  }
  if (grad_f.has_value()) {
    check_like_z(z_in, *grad_f, "grad_f");
    TORCH_CHECK(grad_f->sizes() == z_in.sizes(), "grad_f must have z's shape ", z_in.sizes(), ", got ", grad_f->sizes());
    gf = grad_f->contiguous();
  }
  if (with_trace) {
    check_like_z(z_in, *grad_trace, "grad_trace");
    TORCH_CHECK(grad_trace->dim() == 1 && grad_trace->size(0) == B, "grad_trace must have shape (", B, ",), got ",
                grad_trace->sizes());
    gtr = grad_trace->contiguous();
  }
  const Args args{z_in, weights, patterns, scales, shifts, saved};
  const auto dims = check_layers(args, m, trace);
  const at::Tensor z = z_in.contiguous();
  at::Tensor gz = at::zeros({B, d}, z.options());
  at::Tensor gprobe = trace == 2 && with_trace ? at::zeros({B, d}, z.options()) : at::empty({0}, z.options());
  std::vector<at::Tensor> gw, gs, gc;
  const size_t L = weights.size();
  int64_t width = d;
  for (const auto& nk : dims) width = std::max(width, nk.first);
  std::vector<at::Tensor> keep;  // contiguous copies and W^T alive for the call
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_field_backward_cpu", [&] {
    std::vector<FieldBackLayer<scalar_t>> layers(L);
    const AccSizes sizes = make_layers<scalar_t>(args, dims, keep, layers);
    at::Tensor total = at::zeros({sizes.acc}, z.options());
    if (B > 0) {
      const FieldBackCall<scalar_t> call{nullptr, 0, B, d, m, with_trace ? m : 0, 0, 0, static_cast<int>(trace), act,
                                         z.data_ptr<scalar_t>(), e.defined() ? e.data_ptr<scalar_t>() : nullptr,
                                         gf.defined() ? gf.data_ptr<scalar_t>() : nullptr,
                                         gtr.defined() ? gtr.data_ptr<scalar_t>() : nullptr, gz.data_ptr<scalar_t>(),
                                         gprobe.numel() ? gprobe.data_ptr<scalar_t>() : nullptr, nullptr};
      total = run<scalar_t>(call, layers, sizes, width, z.options());
    }
    for (size_t l = 0; l < L; ++l) {
      const FieldBackLayer<scalar_t>& layer = layers[l];
      gw.push_back(total.narrow(0, layer.gw, weights[l].numel()).view(weights[l].sizes()).clone());
      const auto piece = [&](int64_t off) {
        return off >= 0 ? total.narrow(0, off, layer.fwd.N).clone() : at::empty({0}, z.options());
      };
      gs.push_back(piece(layer.gs));
      gc.push_back(piece(layer.gc));
    }
  });
  return {gz, gprobe, gw, gs, gc};
}

}  // namespace sparseode::cpu

TORCH_LIBRARY_IMPL(sparseode, CPU, m) { m.impl("mlp_field_backward", &sparseode::cpu::mlp_field_backward); }
