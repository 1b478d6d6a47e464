// The fused MLP field op (field_cpu.h): argument checks, the tile width, the threads, and the choice
// of the kernel variant (field_table.h); the kernels themselves are in field_kernels.h.
#include "field_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "../common.h"
#include "field_table.h"

namespace sparseode::cpu {

const FieldKernels& field_kernels() {
  static const FieldKernels& chosen = []() -> const FieldKernels& {
    const char* env = std::getenv("SPARSEODE_CPU_CAPABILITY");
    const std::string cap = env ? env : "avx512";
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (cap == "avx512" && avx512) return field_kernels_avx512();
    if ((cap == "avx512" || cap == "avx2") && avx2) return field_kernels_avx2();
#endif
    return field_kernels_default();
  }();
  return chosen;
}

FieldAct parse_field_activation(std::string_view name) {
  if (name == "identity") return FieldAct::Identity;
  if (name == "tanh") return FieldAct::Tanh;
  if (name == "relu") return FieldAct::Relu;
  if (name == "softplus") return FieldAct::Softplus;
  if (name == "sigmoid") return FieldAct::Sigmoid;
  if (name == "elu") return FieldAct::Elu;
  if (name == "swish") return FieldAct::Swish;
  TORCH_CHECK(false, "activation must be one of identity, tanh, relu, softplus, sigmoid, elu, swish; got '",
              std::string(name), "'");
}

namespace {

// Tile width: 1, 2 or 4 SIMD registers (the kernels take no more), with both panels of the widest
// layer within ~L2/4, and small enough that every thread gets a tile.
int64_t choose_tile(int64_t lanes, int64_t elem, int64_t B, int64_t width, int64_t m) {
  constexpr int64_t kPanelBytes = 256 * 1024;
  const int64_t per_thread = (B + at::get_num_threads() - 1) / at::get_num_threads();
  int64_t tb = lanes;
  while (tb < 4 * lanes && tb < per_thread && 2 * width * (1 + m) * (2 * tb) * elem <= kPanelBytes) tb *= 2;
  return tb;
}

// Per-thread panels, kept between calls (fresh ones would be page-faulted in on every evaluation).
template <typename T>
T* thread_buffer(int slot, size_t n) {
  thread_local std::vector<T> buffers[3];
  std::vector<T>& b = buffers[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

template <typename T>
void run(const std::vector<FieldLayer<T>>& layers, FieldCall<T> call, int64_t width) {
  const FieldKernelsOf<T>& k = field_kernels().of<T>();
  call.TB = choose_tile(field_kernels().lanes<T>(), sizeof(T), call.B, width, call.m);
  call.PW = (1 + call.m) * call.TB;
  call.layers = layers.data();
  call.n_layers = static_cast<int64_t>(layers.size());
  std::vector<int64_t> iota(static_cast<size_t>(width));
  for (size_t i = 0; i < iota.size(); ++i) iota[i] = static_cast<int64_t>(i);
  call.iota = iota.data();
  const int64_t n_tiles = (call.B + call.TB - 1) / call.TB;
  int64_t work = 0;
  for (const auto& layer : layers) work += (layer.crow ? layer.crow[layer.N] : layer.N * layer.K) * call.PW;
  const int64_t grain = work * n_tiles < (1 << 16) ? n_tiles : 1;  // tiny calls: no thread wake-up
  at::parallel_for(0, n_tiles, grain, [&](int64_t begin, int64_t end) {
    const size_t panel = static_cast<size_t>(width * call.PW);
    k.tiles(call, begin, end,
            FieldScratch<T>{thread_buffer<T>(0, panel), thread_buffer<T>(1, panel),
                            thread_buffer<T>(2, static_cast<size_t>(2 * call.PW))});
  });
}

struct Args {
  const at::Tensor& z;
  const std::optional<at::Tensor>& probe;
  at::TensorList weights;
  at::TensorList patterns;
  const c10::List<std::optional<at::Tensor>>& scales;
  const c10::List<std::optional<at::Tensor>>& shifts;
};

}  // namespace

std::vector<std::pair<int64_t, int64_t>> check_field_layers(const at::Tensor& z, at::TensorList weights,
                                                            at::TensorList patterns,
                                                            const c10::List<std::optional<at::Tensor>>& scales,
                                                            const c10::List<std::optional<at::Tensor>>& shifts) {
  constexpr size_t kCsrFields = 5;  // crow, col, crow_t, col_t, perm
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1, "weights must hold at least one layer");
  TORCH_CHECK(scales.size() == L && shifts.size() == L, "scales and shifts must hold one entry per layer (", L,
              "), got ", scales.size(), " and ", shifts.size());
  std::vector<std::pair<int64_t, int64_t>> dims;
  const int64_t d = z.size(1);
  int64_t k = d;
  size_t p = 0;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    CHECK_SAME_DTYPE(z, w);
    CHECK_DEVICE_TYPE(w, at::kCPU);
    int64_t n;
    if (w.dim() == 2) {
      TORCH_CHECK(w.size(1) == k, "weights[", l, "] has ", w.size(1), " input features, expected ", k);
      n = w.size(0);
    } else {
      TORCH_CHECK(w.dim() == 1, "weights[", l, "] must be a dense (N, K) weight or CSR values (nnz,), got shape ",
                  w.sizes());
      TORCH_CHECK(p + kCsrFields <= patterns.size(), "patterns must hold 5 tensors per CSR layer; layer ", l,
                  " has none");
      for (size_t q = p; q < p + kCsrFields; ++q) CHECK_INDEX(patterns[q]);
      const at::Tensor &crow = patterns[p], &crow_t = patterns[p + 2];
      const int64_t nnz = w.size(0);
      TORCH_CHECK(crow.size(0) >= 1 && patterns[p + 1].size(0) == nnz && patterns[p + 3].size(0) == nnz &&
                      patterns[p + 4].size(0) == nnz,
                  "layer ", l, ": the pattern does not match ", nnz, " stored values");
      TORCH_CHECK(crow_t.size(0) - 1 == k, "layer ", l, " has ", crow_t.size(0) - 1, " input features, expected ", k);
      n = crow.size(0) - 1;
      p += kCsrFields;
    }
    for (const auto* list : {&scales, &shifts}) {
      const std::optional<at::Tensor> v = (*list)[l];
      if (!v.has_value()) continue;
      CHECK_SAME_DTYPE(z, (*v));
      TORCH_CHECK(v->dim() == 1 && v->size(0) == n, list == &scales ? "scales[" : "shifts[", l,
                  "] must have shape (", n, ",), got ", v->sizes());
    }
    dims.emplace_back(n, k);
    k = n;
  }
  TORCH_CHECK(k == d, "the last layer has ", k, " outputs, expected the state size ", d);
  TORCH_CHECK(p == patterns.size(), "patterns holds ", patterns.size(), " tensors, the CSR layers use ", p);
  return dims;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_field(
    const at::Tensor& z_in, const std::optional<at::Tensor>& probe, at::TensorList weights, at::TensorList patterns,
    const c10::List<std::optional<at::Tensor>>& scales, const c10::List<std::optional<at::Tensor>>& shifts,
    std::string_view activation, int64_t trace, bool save) {
  CHECK_DIM(z_in, 2);
  CHECK_DEVICE_TYPE(z_in, at::kCPU);
  CHECK_FLOATING(z_in);
  TORCH_CHECK(trace >= 0 && trace <= 2, "trace must be 0 (none), 1 (exact) or 2 (Hutchinson), got ", trace);
  const FieldAct act = parse_field_activation(activation);
  const int64_t B = z_in.size(0), d = z_in.size(1);
  TORCH_CHECK(d >= 1, "z must have at least one feature");
  at::Tensor e;
  if (trace == 2) {
    TORCH_CHECK(probe.has_value(), "the Hutchinson trace needs a probe");
    CHECK_SAME_DTYPE(z_in, (*probe));
    TORCH_CHECK(probe->sizes() == z_in.sizes(), "probe must have z's shape ", z_in.sizes(), ", got ", probe->sizes());
    e = probe->contiguous();
  }
  const Args args{z_in, probe, weights, patterns, scales, shifts};
  const auto dims = check_field_layers(args.z, args.weights, args.patterns, args.scales, args.shifts);
  const at::Tensor z = z_in.contiguous();
  const int64_t m = trace == 1 ? d : (trace == 2 ? 1 : 0);
  at::Tensor f = at::empty({B, d}, z.options());
  at::Tensor tr = at::zeros({B}, z.options());
  std::vector<at::Tensor> saved;
  const size_t L = weights.size();
  if (save)
    for (size_t l = 0; l < L; ++l)
      saved.push_back(at::empty({dims[l].first, l + 1 < L ? 1 + m : 1 + (trace > 0), B}, z.options()));
  if (B == 0) return {f, tr, saved};
  std::vector<at::Tensor> keep;  // contiguous copies alive for the call
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_field_cpu", [&] {
    std::vector<FieldLayer<scalar_t>> layers(L);
    size_t p = 0;
    int64_t width = d;
    const auto ptr = [&](const at::Tensor& t) {
      keep.push_back(t.contiguous());
      return keep.back().data_ptr<scalar_t>();
    };
    for (size_t l = 0; l < L; ++l) {
      FieldLayer<scalar_t>& layer = layers[l];
      layer.N = dims[l].first;
      layer.K = dims[l].second;
      width = std::max(width, layer.N);
      layer.w = ptr(weights[l]);
      if (weights[l].dim() == 1) {
        for (int q = 0; q < 2; ++q) keep.push_back(patterns[p + q].contiguous());
        layer.crow = keep[keep.size() - 2].data_ptr<int64_t>();
        layer.col = keep.back().data_ptr<int64_t>();
        p += 5;
      }
      const std::optional<at::Tensor> s = scales[l], c = shifts[l];
      if (s.has_value()) layer.scale = ptr(*s);
      if (c.has_value()) layer.shift = ptr(*c);
      if (save) {
        layer.saved = saved[l].data_ptr<scalar_t>();
        layer.groups = saved[l].size(1);
      }
    }
    FieldCall<scalar_t> call{nullptr, 0, B, d, m, 0, 0, static_cast<int>(trace), act, z.data_ptr<scalar_t>(),
                             e.defined() ? e.data_ptr<scalar_t>() : nullptr, f.data_ptr<scalar_t>(),
                             tr.data_ptr<scalar_t>(), nullptr};
    run<scalar_t>(layers, call, width);
  });
  return {f, tr, saved};
}

}  // namespace sparseode::cpu

TORCH_LIBRARY_IMPL(sparseode, CPU, m) { m.impl("mlp_field", &sparseode::cpu::mlp_field); }
