// The fused field's kernels, compiled once per instruction-set variant (field_<variant>.cpp define
// FIELD_VARIANT and FIELD_VEC_BYTES, include kernel_prelude.h and field_table.h first, then this
// under `#pragma GCC target`). Raw pointers only: no ATen here, so no ATen inline function is ever
// compiled for a wider instruction set.
//
// A batch tile is kept feature-major in two ping-pong panels of (width, PW) values: TB state
// columns followed by the TB columns of each of the m tangents, so the tile's activations stay in
// L1/L2 from the first layer to the last. Each output row is accumulated in registers by the row
// micro-kernel, then bias, time scale/shift, activation and the activation's derivative on the
// tangent columns are applied while the row is in L1. The last layer computes only the rows of the
// tangent products that the trace reads (row i of tangent i for the exact trace).

namespace sparseode::cpu::FIELD_VARIANT {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(FIELD_VEC_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(FIELD_VEC_BYTES)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = FIELD_VEC_BYTES / sizeof(T);

// out[0 : NV vectors) = sum_{p in [p0, p1)} w[p] x[column(p) * ldx + (0 : NV vectors)], column(p) =
// col[p] (CSR) or p - p0 (dense row). Below 8 registers of accumulators, two partial sums over
// alternating entries keep enough independent multiply-adds in flight.
template <typename T, int NV>
inline void row_chunk(const T* __restrict w, const int64_t* __restrict col, int64_t p0, int64_t p1,
                      const T* __restrict x, int64_t ldx, T* __restrict out) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  constexpr int P = NV >= 8 ? 1 : 2;
  V acc[P][NV];
#pragma GCC unroll 8
  for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) acc[q][n] = V{};
  auto add = [&](int q, int64_t p) __attribute__((always_inline)) {
    const T* xr = x + (col ? col[p] : p - p0) * ldx;
    const V v = V{} + w[p];
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) {
      V xv;
      std::memcpy(&xv, xr + n * L, sizeof(V));
      acc[q][n] += v * xv;
    }
  };
  int64_t p = p0;
  for (; p + P <= p1; p += P) {
#pragma GCC unroll 2
    for (int q = 0; q < P; ++q) add(q, p + q);
  }
  for (; p < p1; ++p) add(0, p);
#pragma GCC unroll 8
  for (int n = 0; n < NV; ++n) {
    V s = acc[0][n];
    if constexpr (P > 1) s += acc[1][n];
    std::memcpy(out + n * L, &s, sizeof(V));
  }
}

// out[j - j0] = sum_p w[p] x[column(p) * ldx + j] for j in [j0, j1); vectors first, then a scalar tail.
template <typename T>
inline void row_product(const T* w, const int64_t* col, int64_t p0, int64_t p1, const T* x, int64_t ldx,
                        int64_t j0, int64_t j1, T* out) {
  constexpr int64_t L = kLanes<T>;
  int64_t j = j0;
  out -= j0;
  for (; j + 8 * L <= j1; j += 8 * L) row_chunk<T, 8>(w, col, p0, p1, x + j, ldx, out + j);
  if (j + 4 * L <= j1) {
    row_chunk<T, 4>(w, col, p0, p1, x + j, ldx, out + j);
    j += 4 * L;
  }
  if (j + 2 * L <= j1) {
    row_chunk<T, 2>(w, col, p0, p1, x + j, ldx, out + j);
    j += 2 * L;
  }
  if (j + L <= j1) {
    row_chunk<T, 1>(w, col, p0, p1, x + j, ldx, out + j);
    j += L;
  }
  for (; j < j1; ++j) {
    T s = T(0);
    for (int64_t p = p0; p < p1; ++p) s += w[p] * x[(col ? col[p] : p - p0) * ldx + j];
    out[j] = s;
  }
}

template <typename T>
inline void layer_row(const FieldLayer<T>& layer, int64_t n, const T* x, int64_t ldx, int64_t j0, int64_t j1,
                      T* out) {
  if (layer.crow) {
    row_product(layer.w, layer.col, layer.crow[n], layer.crow[n + 1], x, ldx, j0, j1, out);
  } else {
    row_product(layer.w, static_cast<const int64_t*>(nullptr), n * layer.K, n * layer.K + layer.K, x, ldx, j0, j1,
                out);
  }
}

// y = act(v) and dy = act'(v) from the pre-activation v, branch-free so the loop vectorises.
template <typename T, FieldAct ACT>
inline void activate_with_derivative(T v, T& y, T& dy) {
  if constexpr (ACT == FieldAct::Identity) {
    y = v;
    dy = T(1);
  } else if constexpr (ACT == FieldAct::Tanh) {
    y = tanh_fast(v);
    dy = T(1) - y * y;
  } else if constexpr (ACT == FieldAct::Relu) {
    y = v < T(0) ? T(0) : v;  // keeps NaN, like torch.relu
    dy = v > T(0) ? T(1) : T(0);
  } else if constexpr (ACT == FieldAct::Sigmoid) {
    y = T(0.5) * tanh_fast(T(0.5) * v) + T(0.5);
    dy = y * (T(1) - y);
  } else if constexpr (ACT == FieldAct::Softplus) {
    // torch's softplus (beta 1, threshold 20): log1p(exp(v)), linear past 20; derivative sigmoid(v)
    const T e = std::exp(v > T(20) ? T(20) : v);
    y = v > T(20) ? v : std::log1p(e);
    dy = v > T(20) ? T(1) : e / (T(1) + e);
  } else if constexpr (ACT == FieldAct::Elu) {  // alpha 1
    const T em1 = std::expm1(v > T(0) ? T(0) : v);
    y = v > T(0) ? v : em1;
    dy = v > T(0) ? T(1) : em1 + T(1);
  } else {  // Swish: v * sigmoid(v)
    const T s = T(0.5) * tanh_fast(T(0.5) * v) + T(0.5);
    y = v * s;
    dy = s + y * (T(1) - s);
  }
}

// Copies batch rows [b0, b0 + nb) of z (and the tangents) into the feature-major input panel.
template <typename T>
void pack_input(const FieldCall<T>& g, int64_t b0, int64_t nb, T* panel) {
  std::fill(panel, panel + g.d * g.PW, T(0));
  for (int64_t i = 0; i < g.d; ++i) {
    T* row = panel + i * g.PW;
    for (int64_t j = 0; j < nb; ++j) row[j] = g.z[(b0 + j) * g.d + i];
    if (g.trace == 1) {  // tangent i is the unit vector e_i: row i of its block is ones
      std::fill(row + g.TB * (1 + i), row + g.TB * (1 + i) + nb, T(1));
    } else if (g.trace == 2) {
      for (int64_t j = 0; j < nb; ++j) row[g.TB + j] = g.probe[(b0 + j) * g.d + i];
    }
  }
}

// Hidden-layer epilogue of output row n (PW values in L1): records the products for the backward,
// then states <- act(scale * u + shift), tangents <- act'(pre) * scale * v.
template <typename T, FieldAct ACT>
void hidden_epilogue(const FieldLayer<T>& layer, const FieldCall<T>& g, int64_t n, int64_t b0, int64_t nb,
                     T* __restrict y, T* __restrict slope) {
  if (layer.saved)
    for (int64_t q = 0; q <= g.m; ++q) std::copy_n(y + q * g.TB, nb, layer.saved + (n * layer.groups + q) * g.B + b0);
  const T s = layer.scale ? layer.scale[n] : T(1), c = layer.shift ? layer.shift[n] : T(0);
  for (int64_t j = 0; j < g.TB; ++j) {
    T out, dout;
    activate_with_derivative<T, ACT>(s * y[j] + c, out, dout);
    y[j] = out;
    slope[j] = dout * s;
  }
  for (int64_t q = 1; q <= g.m; ++q) {
    T* __restrict v = y + q * g.TB;
    for (int64_t j = 0; j < g.TB; ++j) v[j] *= slope[j];
  }
}

// The last layer on the panel x: f rows and the trace term for the tile's columns.
template <typename T>
void last_layer(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, int64_t b0, int64_t nb, T* row) {
  for (int64_t n = 0; n < g.d; ++n) {
    // state columns, and the tangent block the trace reads: exact block n, Hutchinson the probe's
    const int64_t t0 = g.trace == 1 ? g.TB * (1 + n) : g.TB;
    layer_row(layer, n, x, g.PW, 0, g.TB, row);
    if (g.trace) layer_row(layer, n, x, g.PW, t0, t0 + g.TB, row + g.TB);
    const T s = layer.scale ? layer.scale[n] : T(1), c = layer.shift ? layer.shift[n] : T(0);
    for (int64_t j = 0; j < nb; ++j) g.f[(b0 + j) * g.d + n] = s * row[j] + c;
    if (g.trace == 1) {
      for (int64_t j = 0; j < nb; ++j) g.trace_out[b0 + j] += s * row[g.TB + j];
    } else if (g.trace == 2) {
      for (int64_t j = 0; j < nb; ++j) g.trace_out[b0 + j] += g.probe[(b0 + j) * g.d + n] * s * row[g.TB + j];
    }
    if (layer.saved)
      for (int64_t q = 0; q < layer.groups; ++q)
        std::copy_n(row + q * g.TB, nb, layer.saved + (n * layer.groups + q) * g.B + b0);
  }
}

// NaN in f and the trace for samples whose state holds NaN or Inf (a pruned weight skips them
// where the dense field would give NaN or Inf).
template <typename T>
void poison_nonfinite(const FieldCall<T>& g, int64_t b0, int64_t nb) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t j = 0; j < nb; ++j) {
    T check = T(0);
    for (int64_t i = 0; i < g.d; ++i) check += g.z[(b0 + j) * g.d + i] * T(0);
    if (check == T(0)) continue;
    for (int64_t i = 0; i < g.d; ++i) g.f[(b0 + j) * g.d + i] = nan;
    g.trace_out[b0 + j] = nan;
  }
}

template <typename T, FieldAct ACT>
void tiles_act(const FieldCall<T>& g, int64_t begin, int64_t end, const FieldScratch<T>& s) {
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t b0 = tile * g.TB, nb = std::min(g.TB, g.B - b0);
    T* x = s.a;
    T* y = s.b;
    pack_input(g, b0, nb, x);
    for (int64_t l = 0; l + 1 < g.n_layers; ++l) {
      const FieldLayer<T>& layer = g.layers[l];
      for (int64_t n = 0; n < layer.N; ++n) {
        T* out = y + n * g.PW;
        layer_row(layer, n, x, g.PW, 0, g.PW, out);
        hidden_epilogue<T, ACT>(layer, g, n, b0, nb, out, s.row);
      }
      std::swap(x, y);
    }
    last_layer(g.layers[g.n_layers - 1], g, x, b0, nb, s.row);
    poison_nonfinite(g, b0, nb);
  }
}

template <typename T>
void tiles(const FieldCall<T>& g, int64_t begin, int64_t end, const FieldScratch<T>& s) {
  using A = FieldAct;
  switch (g.act) {
    case A::Identity: return tiles_act<T, A::Identity>(g, begin, end, s);
    case A::Tanh: return tiles_act<T, A::Tanh>(g, begin, end, s);
    case A::Relu: return tiles_act<T, A::Relu>(g, begin, end, s);
    case A::Softplus: return tiles_act<T, A::Softplus>(g, begin, end, s);
    case A::Sigmoid: return tiles_act<T, A::Sigmoid>(g, begin, end, s);
    case A::Elu: return tiles_act<T, A::Elu>(g, begin, end, s);
    case A::Swish: return tiles_act<T, A::Swish>(g, begin, end, s);
  }
}

template <typename T>
void transposed_row(const T* a, const T* values_t, const int64_t* crow_t, const int64_t* col_t, int64_t P,
                    int64_t k, int64_t j0, int64_t j1, T* out) {
  row_product(values_t, col_t, crow_t[k], crow_t[k + 1], a, P, j0, j1, out);
}

template <typename T>
void sddmm_rows(const T* a, const T* c, const int64_t* crow, const int64_t* col, int64_t P, int64_t r0, int64_t r1,
                T* out) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* ar = a + r * P;
    for (int64_t p = crow[r]; p < crow[r + 1]; ++p) {
      const T* cr = c + col[p] * P;
      V acc[4] = {};
      int64_t j = 0;
      for (; j + 4 * L <= P; j += 4 * L)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          V av, cv;
          std::memcpy(&av, ar + j + q * L, sizeof(V));
          std::memcpy(&cv, cr + j + q * L, sizeof(V));
          acc[q] += av * cv;
        }
      const V sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      T s = T(0);
      for (int64_t l = 0; l < L; ++l) s += sum[l];
      for (; j < P; ++j) s += ar[j] * cr[j];
      out[p] = s;
    }
  }
}

inline FieldKernels make_field_table(const char* name) {
  return FieldKernels{name,
                      kLanes<float>,
                      kLanes<double>,
                      {&tiles<float>, &transposed_row<float>, &sddmm_rows<float>},
                      {&tiles<double>, &transposed_row<double>, &sddmm_rows<double>}};
}

}  // namespace sparseode::cpu::FIELD_VARIANT
