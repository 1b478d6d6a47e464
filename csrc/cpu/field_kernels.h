// The fused field's row kernels, compiled once per instruction-set variant (field_<variant>.cpp define
// FIELD_VARIANT and FIELD_VEC_BYTES, include kernel_prelude.h and field_table.h first, then
// field_tiles.h, which includes this, under `#pragma GCC target`; the backward's variants include
// this alone). Raw pointers only: no ATen here, so no ATen inline function is ever compiled for a
// wider instruction set.
//
// A batch tile is kept feature-major in two ping-pong panels of (width, PW) values: TB state
// columns followed by the TB columns of each of the m tangents, so the tile's activations stay in
// L1/L2 from the first layer to the last. A hidden row's state and tangent columns accumulate in
// registers (hidden_pass), where bias, time scale/shift, activation and the activation's derivative
// on the tangent columns are applied before one store. The last layer computes only the rows of the
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

// Accumulator registers a hidden row's micro-kernel may hold: AVX-512 has 32 vector registers,
// AVX2 16 (the rest hold the x loads and the broadcast weight).
constexpr int kAccumulators = FIELD_VEC_BYTES == 64 ? 16 : 12;

template <typename T, size_t... I>
inline Vec<T> splat_lanes(T w, std::index_sequence<I...>) {
  return Vec<T>{((void)I, w)...};
}
// w in every lane: one broadcast (`Vec<T>{} + w` costs an add of -0.0-preserving zero first).
template <typename T>
inline Vec<T> splat(T w) {
  return splat_lanes<T>(w, std::make_index_sequence<static_cast<size_t>(kLanes<T>)>{});
}
template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

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
    const V v = splat(w[p]);
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

// tanh of every lane: float by tanh_rational (activation.h) on whole vectors, double lane by lane.
template <typename T>
__attribute__((always_inline)) inline Vec<T> tanh_vec(Vec<T> a) {
  if constexpr (std::is_same_v<T, float>) {
    return tanh_rational(a);
  } else {
    Vec<T> y;
    for (int64_t l = 0; l < kLanes<T>; ++l) y[l] = std::tanh(a[l]);
    return y;
  }
}

// y = act(pre), dy = act'(pre) on whole vectors, the activation a compile-time constant so that the
// tile's vectors interleave; softplus and elu (exp/log1p) lane by lane. An unused dy costs nothing.
template <typename T, FieldAct ACT>
__attribute__((always_inline)) inline void activate_vec(Vec<T> pre, Vec<T>& y, Vec<T>& dy) {
  using V = Vec<T>;
  const V one = splat(T(1)), zero = V{};
  if constexpr (ACT == FieldAct::Identity) {
    y = pre;
    dy = one;
  } else if constexpr (ACT == FieldAct::Tanh) {
    y = tanh_vec<T>(pre);
    dy = one - y * y;
  } else if constexpr (ACT == FieldAct::Relu) {
    y = pre < T(0) ? zero : pre;  // keeps NaN
    dy = pre > T(0) ? one : zero;
  } else if constexpr (ACT == FieldAct::Sigmoid) {
    y = T(0.5) * tanh_vec<T>(T(0.5) * pre) + T(0.5);
    dy = y * (one - y);
  } else if constexpr (ACT == FieldAct::Swish) {
    const V sg = T(0.5) * tanh_vec<T>(T(0.5) * pre) + T(0.5);
    y = pre * sg;
    dy = sg + y * (one - sg);
  } else {  // Softplus, Elu
    for (int64_t l = 0; l < kLanes<T>; ++l) {
      T yl, dl;
      activate_with_derivative<T, ACT>(pre[l], yl, dl);
      y[l] = yl;
      dy[l] = dl;
    }
  }
}

// acc[q][v] = sum_e w[e] x[col[e] * ldx + q * gs + v * L] over the cnt entries of a row: G groups
// (the state block, tangent blocks) of NV vectors each, all in registers, so each weight is
// broadcast once per G * NV multiply-adds.
template <typename T, int G, int NV>
inline void accumulate(const T* __restrict w, const int64_t* __restrict col, int64_t cnt, const T* __restrict x,
                       int64_t ldx, int64_t gs, Vec<T> (&acc)[G][NV]) {
  constexpr int64_t L = kLanes<T>;
#pragma GCC unroll 4
  for (int q = 0; q < G; ++q)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[q][v] = Vec<T>{};
  for (int64_t e = 0; e < cnt; ++e) {
    const T* xr = x + col[e] * ldx;
    const Vec<T> wv = splat(w[e]);
#pragma GCC unroll 4
    for (int q = 0; q < G; ++q)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][v] += wv * load(xr + q * gs + v * L);
  }
}

// The end of a pass over groups [g0, g0 + G) of hidden row n with its products acc (TB = NV
// lanes-vectors): recorded for the backward, then in registers states <- act(s u + c) and tangents
// <- act'(pre) s V. A STATE pass holds the state block (g0 = 0) and applies the activation; with
// KEEP_SLOPE (more passes follow for this row) it leaves act'(pre) s (TB values) in `slope` for them.
template <typename T, FieldAct ACT, int G, int NV, bool STATE, bool KEEP_SLOPE>
__attribute__((always_inline)) inline void pass_epilogue(const FieldLayer<T>& layer, const FieldCall<T>& g,
                                                         int64_t n, T* y, int64_t g0, int64_t b0, int64_t nb,
                                                         T* __restrict slope, const Vec<T> (&acc)[G][NV]) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>, TB = NV * L;  // g.TB, as a constant (a store could alias g)
  // Every loop over acc is unrolled: one indexed at run time would keep the accumulators in memory.
  if (layer.saved) {
#pragma GCC unroll 4
    for (int q = 0; q < G; ++q) {
      T* dst = layer.saved + (n * layer.groups + g0 + q) * g.B + b0;
      if (nb == TB) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) store(dst + v * L, acc[q][v]);
      } else {
        T tmp[TB];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) store(tmp + v * L, acc[q][v]);
        std::copy_n(tmp, nb, dst);
      }
    }
  }
  T* out = y + n * g.PW + g0 * TB;
  V sl[NV];
  if constexpr (STATE) {
    const T s = layer.scale ? layer.scale[n] : T(1), c = layer.shift ? layer.shift[n] : T(0);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V h, dh;
      activate_vec<T, ACT>(s * acc[0][v] + c, h, dh);
      store(out + v * L, h);
      sl[v] = dh * s;
    }
    if constexpr (KEEP_SLOPE) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) store(slope + v * L, sl[v]);
    }
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) sl[v] = load(slope + v * L);
  }
#pragma GCC unroll 4
  for (int q = STATE ? 1 : 0; q < G; ++q)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(out + q * TB + v * L, acc[q][v] * sl[v]);
}

// A pass over groups [g0, g0 + G) of hidden row n: the products over the row's stored entries, then
// pass_epilogue. Inlined into the row loop of hidden_rows, so per row only these remain.
template <typename T, FieldAct ACT, int G, int NV, bool STATE, bool KEEP_SLOPE>
__attribute__((always_inline)) inline void hidden_pass(const FieldLayer<T>& layer, const FieldCall<T>& g, int64_t n,
                                                       const T* x, T* y, int64_t g0, int64_t b0, int64_t nb,
                                                       T* __restrict slope) {
  constexpr int64_t TB = NV * kLanes<T>;
  const int64_t p0 = layer.crow ? layer.crow[n] : n * layer.K;
  const int64_t cnt = layer.crow ? layer.crow[n + 1] - p0 : layer.K;
  Vec<T> acc[G][NV];
  accumulate<T, G, NV>(layer.w + p0, layer.crow ? layer.col + p0 : g.iota, cnt, x + g0 * TB, g.PW, TB, acc);
  pass_epilogue<T, ACT, G, NV, STATE, KEEP_SLOPE>(layer, g, n, y, g0, b0, nb, slope, acc);
}

// Groups a hidden pass holds at once with NV vectors each.
template <int NV>
constexpr int kPassGroups = std::max(1, std::min(4, kAccumulators / NV));

// Later passes of a row (tangent groups only, act'(pre) s from `slope`): the left groups of the row.
template <typename T, int NV>
inline void tangent_passes(const FieldLayer<T>& layer, const FieldCall<T>& g, int64_t n, const T* x, T* y,
                           int64_t g0, int64_t b0, int64_t nb, T* slope) {
  constexpr int GP = kPassGroups<NV>;
  constexpr FieldAct I = FieldAct::Identity;  // unused by a pass without the state block
  for (; g0 < 1 + g.m; g0 += GP) {
    const int64_t left = std::min<int64_t>(GP, 1 + g.m - g0);
    if (left >= 4 && GP >= 4) {
      hidden_pass<T, I, std::min(4, GP), NV, false, false>(layer, g, n, x, y, g0, b0, nb, slope);
    } else if (left == 3 && GP >= 3) {
      hidden_pass<T, I, std::min(3, GP), NV, false, false>(layer, g, n, x, y, g0, b0, nb, slope);
    } else if (left == 2 && GP >= 2) {
      hidden_pass<T, I, std::min(2, GP), NV, false, false>(layer, g, n, x, y, g0, b0, nb, slope);
    } else {
      hidden_pass<T, I, 1, NV, false, false>(layer, g, n, x, y, g0, b0, nb, slope);
    }
  }
}

// Every row of a hidden layer for one tile whose 1 + m groups fit one pass of G groups.
template <typename T, FieldAct ACT, int G, int NV>
void hidden_rows(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, T* y, int64_t b0, int64_t nb) {
  for (int64_t n = 0; n < layer.N; ++n) hidden_pass<T, ACT, G, NV, true, false>(layer, g, n, x, y, 0, b0, nb, nullptr);
}

// Every row of a hidden layer for one tile: one pass per row when its 1 + m groups fit the
// registers (the usual case: no trace, Hutchinson, exact trace of d <= 3), else ceil((1 + m) / GP).
template <typename T, FieldAct ACT, int NV>
void hidden_layer(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, T* y, int64_t b0, int64_t nb,
                  T* slope) {
  constexpr int GP = kPassGroups<NV>;
  switch (1 + g.m) {
    case 1: return hidden_rows<T, ACT, 1, NV>(layer, g, x, y, b0, nb);
    case 2: if constexpr (GP >= 2) return hidden_rows<T, ACT, 2, NV>(layer, g, x, y, b0, nb); break;
    case 3: if constexpr (GP >= 3) return hidden_rows<T, ACT, 3, NV>(layer, g, x, y, b0, nb); break;
    case 4: if constexpr (GP >= 4) return hidden_rows<T, ACT, 4, NV>(layer, g, x, y, b0, nb); break;
    default: break;
  }
  for (int64_t n = 0; n < layer.N; ++n) {
    hidden_pass<T, ACT, GP, NV, true, true>(layer, g, n, x, y, 0, b0, nb, slope);
    tangent_passes<T, NV>(layer, g, n, x, y, GP, b0, nb, slope);
  }
}

}  // namespace sparseode::cpu::FIELD_VARIANT
