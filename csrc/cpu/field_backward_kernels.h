// The fused field's backward, compiled once per instruction-set variant (field_backward_<variant>.cpp
// include this after field_kernels.h, in a namespace nested in its own: it reuses the row micro-kernel
// row_product, the vector types and activate_with_derivative). Raw pointers only, no ATen.
//
// Tile by tile over the batch, the last layer first: the adjoint panel adj = [gu | gV] (N, PW) of a
// layer (feature-major, the tile's TB state columns then the TB columns of each of the mb tangents)
// gives, with the layer's recomputed input panel X = [h | T] (K, PW):
//   dL/dW += adj X^T at the stored positions,   back = W^T adj (K, PW) = [gh | gT] of the inputs,
// and from back, with pre = s u + c, Tpre = s V of the layer below (u, V: its saved products):
//   gTpre = act'(pre) gT,  gpre = act'(pre) gh + act''(pre) sum_q gT_q Tpre_q,
//   dL/dc += sum_b gpre,   dL/ds += sum_b (gpre u + sum_q gTpre_q V_q),   its adj = s [gpre | gTpre].
// Everything elementwise is recomputed from the saved products while the tile's rows are in L1.
// A wide, dense enough layer runs both products as GEMMs on the tile's panels instead (FieldGemm,
// given by the ATen side): dense work at GEMM speed beats sparse rows there.

namespace sparseode::cpu::FIELD_VARIANT::backward {

// act''(v) from v, y = act(v) and d1 = act'(v).
template <typename T, FieldAct ACT>
inline T second_derivative(T v, T y, T d1) {
  if constexpr (ACT == FieldAct::Identity || ACT == FieldAct::Relu) {
    return T(0);
  } else if constexpr (ACT == FieldAct::Tanh) {
    return T(-2) * y * d1;
  } else if constexpr (ACT == FieldAct::Sigmoid) {
    return d1 * (T(1) - T(2) * y);
  } else if constexpr (ACT == FieldAct::Softplus) {  // linear past torch's threshold 20
    return v > T(20) ? T(0) : d1 * (T(1) - d1);
  } else if constexpr (ACT == FieldAct::Elu) {
    return v > T(0) ? T(0) : d1;
  } else {  // Swish: sigma(v) (1 - sigma(v)) (2 + v (1 - 2 sigma(v)))
    const T s = T(0.5) * tanh_fast(T(0.5) * v) + T(0.5);
    return s * (T(1) - s) * (T(2) + v * (T(1) - T(2) * s));
  }
}

// sum_j a[j] b[j] for n a multiple of the vector lanes.
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  V acc[4] = {};
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      V av, bv;
      std::memcpy(&av, a + j + q * L, sizeof(V));
      std::memcpy(&bv, b + j + q * L, sizeof(V));
      acc[q] += av * bv;
    }
  for (; j < n; j += L) {
    V av, bv;
    std::memcpy(&av, a + j, sizeof(V));
    std::memcpy(&bv, b + j, sizeof(V));
    acc[0] += av * bv;
  }
  const V sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  T s = T(0);
  for (int64_t l = 0; l < L; ++l) s += sum[l];
  return s;
}

// gw += (adj X^T) at the layer's stored positions (every position of a dense layer), over `cols` columns.
template <typename T>
void weight_grad(const FieldBackLayer<T>& layer, const T* adj, const T* x, int64_t PW, int64_t cols, T* gw) {
  const FieldLayer<T>& f = layer.fwd;
  for (int64_t n = 0; n < f.N; ++n) {
    const T* an = adj + n * PW;
    if (f.crow) {
      for (int64_t p = f.crow[n]; p < f.crow[n + 1]; ++p) gw[p] += dot(an, x + f.col[p] * PW, cols);
    } else {
      for (int64_t k = 0; k < f.K; ++k) gw[n * f.K + k] += dot(an, x + k * PW, cols);
    }
  }
}

// out[k, 0:cols) = (W^T adj)[k] for the K input rows.
template <typename T>
void transposed_product(const FieldBackLayer<T>& layer, const T* adj, int64_t PW, int64_t cols, T* out) {
  const FieldLayer<T>& f = layer.fwd;
  for (int64_t k = 0; k < f.K; ++k) {
    if (layer.crow_t) {
      row_product(layer.wt, layer.col_t, layer.crow_t[k], layer.crow_t[k + 1], adj, PW, 0, cols, out + k * PW);
    } else {
      row_product(layer.wt, static_cast<const int64_t*>(nullptr), k * f.N, k * f.N + f.N, adj, PW, 0, cols,
                  out + k * PW);
    }
  }
}

// The layer's weight gradient from the tile's panels: a GEMM into the dense gradient on the GEMM
// path (a CSR layer's into the chunk's dense_gw, gathered later), else the sparse dots.
template <typename T>
void layer_weight_grad(const FieldBackLayer<T>& layer, const FieldBackCall<T>& g, const T* adj, const T* x,
                       int64_t cols, const FieldBackScratch<T>& s) {
  if (layer.gw < 0) return;
  const FieldLayer<T>& f = layer.fwd;
  if (layer.dense) {
    T* gw = f.crow ? s.dense_gw + layer.dense_gw : s.acc + layer.gw;
    g.gemm(false, true, f.N, f.K, cols, adj, g.PW, x, g.PW, true, gw, f.K);
  } else {
    weight_grad(layer, adj, x, g.PW, cols, s.acc + layer.gw);
  }
}

// out (K, cols) = W^T adj: one GEMM on the GEMM path, else W^T's sparse rows.
template <typename T>
void layer_transposed_product(const FieldBackLayer<T>& layer, const FieldBackCall<T>& g, const T* adj, int64_t cols,
                              T* out) {
  const FieldLayer<T>& f = layer.fwd;
  if (layer.dense) {
    g.gemm(true, false, f.K, cols, f.N, layer.dense, f.K, adj, g.PW, false, out, g.PW);
  } else {
    transposed_product(layer, adj, g.PW, cols, out);
  }
}

template <typename T>
inline const T* saved_row(const FieldLayer<T>& f, const FieldBackCall<T>& g, int64_t n, int64_t group, int64_t b0) {
  return f.saved + (n * f.groups + group) * g.B + b0;
}

// Rows this far ahead of the one being read are prefetched: the saved products are (N, groups, B),
// so a tile reads a short segment (TB samples) of each row, strided by groups * B, which the
// hardware prefetchers do not follow; without it every segment waited on L3 or memory (perf: most of
// the backward's time at low density went to those loads).
constexpr int64_t kPrefetchRows = 6;

// Prefetch of the cache line holding p into all levels. On x86 as an asm statement: GCC 12 dropped
// __builtin_prefetch from this loop (none were in the object code).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// Prefetches the tile's segments [b0, b0 + nb) of the groups of saved row n the backward reads (the
// state and the mb tangents; nothing past the last row).
template <typename T>
inline void prefetch_saved(const FieldLayer<T>& f, const FieldBackCall<T>& g, int64_t n, int64_t b0, int64_t nb) {
  if (n >= f.N) return;
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t q = 0; q <= g.mb; ++q) {
    const T* row = saved_row(f, g, n, q, b0);
    for (int64_t j = 0; j < nb; j += kLine) prefetch_line(row + j);
    prefetch_line(row + nb - 1);
  }
}

// The input panel X = [h | T] of the layer above `prev` (prev's outputs) and act', act'' of prev's
// pre-activations, recomputed from prev's saved products; padding columns hold act(shift), times 0.
template <typename T, FieldAct ACT>
void hidden_inputs(const FieldLayer<T>& prev, const FieldBackCall<T>& g, int64_t b0, int64_t nb,
                   const FieldBackScratch<T>& s) {
  for (int64_t k = 0; k < kPrefetchRows; ++k) prefetch_saved(prev, g, k, b0, nb);
  for (int64_t k = 0; k < prev.N; ++k) {
    prefetch_saved(prev, g, k + kPrefetchRows, b0, nb);
    T* __restrict x = s.input + k * g.PW;
    T* __restrict d1 = s.d1 + k * g.TB;
    T* __restrict d2 = s.d2 + k * g.TB;
    const T sc = prev.scale ? prev.scale[k] : T(1), c = prev.shift ? prev.shift[k] : T(0);
    std::copy_n(saved_row(prev, g, k, 0, b0), nb, x);
    std::fill(x + nb, x + g.TB, T(0));
    for (int64_t j = 0; j < g.TB; ++j) {
      const T v = sc * x[j] + c;
      T y, dy;
      activate_with_derivative<T, ACT>(v, y, dy);
      x[j] = y;
      d1[j] = dy;
      d2[j] = second_derivative<T, ACT>(v, y, dy);
    }
    for (int64_t q = 0; q < g.mb; ++q) {
      const T* __restrict v = saved_row(prev, g, k, 1 + q, b0);
      T* __restrict t = x + g.TB * (1 + q);
      for (int64_t j = 0; j < nb; ++j) t[j] = d1[j] * sc * v[j];
      std::fill(t + nb, t + g.TB, T(0));
    }
  }
}

template <typename T>
inline T lane_sum(Vec<T> v) {
  T s = T(0);
  for (int64_t l = 0; l < kLanes<T>; ++l) s += v[l];
  return s;
}

// panel: back = [gh | gT] of prev's outputs in, prev's adjoint s [gpre | gTpre] out (in place);
// prev's scale and shift gradients accumulate into acc. Whole vectors up to the last full one of
// the tile's nb samples (with vector accumulators for the sums: a scalar running sum here cost a
// horizontal add per element), the rest lane by lane.
template <typename T>
void hidden_adjoint(const FieldBackLayer<T>& prev_layer, const FieldBackCall<T>& g, int64_t b0, int64_t nb,
                    T* panel, const FieldBackScratch<T>& s) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const FieldLayer<T>& prev = prev_layer.fwd;
  const int64_t nv = nb / L * L;
  for (int64_t k = 0; k < prev.N; ++k) {
    T* __restrict gpre = panel + k * g.PW;
    const T* __restrict d1 = s.d1 + k * g.TB;
    const T* __restrict d2 = s.d2 + k * g.TB;
    const T sc = prev.scale ? prev.scale[k] : T(1);
    const T* __restrict u = saved_row(prev, g, k, 0, b0);
    for (int64_t j = 0; j < nb; ++j) gpre[j] *= d1[j];
    V gs_v{}, gc_v{};
    T gs = T(0), gc = T(0);
    for (int64_t q = 0; q < g.mb; ++q) {
      T* __restrict gt = gpre + g.TB * (1 + q);
      const T* __restrict v = saved_row(prev, g, k, 1 + q, b0);
      int64_t j = 0;
      for (; j < nv; j += L) {
        const V vv = load(v + j), d1v = load(d1 + j);
        V gtv = load(gt + j);
        store(gpre + j, load(gpre + j) + load(d2 + j) * sc * gtv * vv);
        gtv *= d1v;
        store(gt + j, gtv);
        gs_v += gtv * vv;
      }
      for (; j < nb; ++j) {
        gpre[j] += d2[j] * sc * gt[j] * v[j];
        gt[j] *= d1[j];
        gs += gt[j] * v[j];
      }
    }
    int64_t j = 0;
    for (; j < nv; j += L) {
      const V gp = load(gpre + j);
      gc_v += gp;
      gs_v += gp * load(u + j);
    }
    for (; j < nb; ++j) {
      gc += gpre[j];
      gs += gpre[j] * u[j];
    }
    gc += lane_sum<T>(gc_v);
    gs += lane_sum<T>(gs_v);
    if (prev_layer.gc >= 0) s.acc[prev_layer.gc + k] += gc;
    if (prev_layer.gs >= 0) s.acc[prev_layer.gs + k] += gs;
    if (prev.scale)
      for (int64_t i = 0; i < g.PW; ++i) gpre[i] *= sc;
  }
}

// The last layer's adjoint panel [s gpre | s gV] from gf and gtr (f = s u + c; the trace reads row
// n of tangent n (exact) or probe-weighted rows (Hutchinson) of the saved r = W T); its scale and
// shift gradients into acc, and the trace's direct share of the probe's gradient into gprobe.
template <typename T>
void last_adjoint(const FieldBackLayer<T>& last, const FieldBackCall<T>& g, int64_t b0, int64_t nb, T* adj,
                  T* acc) {
  const FieldLayer<T>& f = last.fwd;
  std::fill(adj, adj + g.d * g.PW, T(0));
  for (int64_t n = 0; n < g.d; ++n) {
    T* __restrict a = adj + n * g.PW;
    const T sc = f.scale ? f.scale[n] : T(1);
    const T* __restrict u = saved_row(f, g, n, 0, b0);
    T gs = T(0), gc = T(0);
    if (g.gf) {
      for (int64_t j = 0; j < nb; ++j) {
        a[j] = g.gf[(b0 + j) * g.d + n];
        gc += a[j];
        gs += a[j] * u[j];
      }
    }
    if (g.mb) {
      const T* __restrict r = saved_row(f, g, n, 1, b0);
      T* __restrict t = a + g.TB * (g.trace == 1 ? 1 + n : 1);
      for (int64_t j = 0; j < nb; ++j) {
        const T w = g.trace == 1 ? g.gtr[b0 + j] : g.gtr[b0 + j] * g.probe[(b0 + j) * g.d + n];
        t[j] = w;
        gs += w * r[j];
      }
      if (g.gprobe)
        for (int64_t j = 0; j < nb; ++j) g.gprobe[(b0 + j) * g.d + n] = g.gtr[b0 + j] * sc * r[j];
    }
    if (last.gc >= 0) acc[last.gc + n] += gc;
    if (last.gs >= 0) acc[last.gs + n] += gs;
    if (f.scale)
      for (int64_t j = 0; j < g.PW; ++j) a[j] *= sc;
  }
}

// The first layer: its weight gradient against the input panel [z | tangents] and the gradients of
// z (and of the probe, as the first tangent) from W^T adj.
template <typename T>
void first_layer(const FieldBackLayer<T>& first, const FieldBackCall<T>& g, int64_t b0, int64_t nb, const T* adj,
                 T* back, const FieldBackScratch<T>& s) {
  for (int64_t i = 0; i < g.d; ++i) {
    T* x = s.input + i * g.PW;
    std::fill(x, x + g.PW, T(0));
    for (int64_t j = 0; j < nb; ++j) x[j] = g.z[(b0 + j) * g.d + i];
    if (g.mb && g.trace == 1) {  // tangent i is the unit vector e_i: row i of its block is ones
      std::fill(x + g.TB * (1 + i), x + g.TB * (1 + i) + nb, T(1));
    } else if (g.mb) {
      for (int64_t j = 0; j < nb; ++j) x[g.TB + j] = g.probe[(b0 + j) * g.d + i];
    }
  }
  layer_weight_grad(first, g, adj, s.input, g.PW, s);
  layer_transposed_product(first, g, adj, g.gprobe ? g.PW : g.TB, back);
  for (int64_t i = 0; i < g.d; ++i) {
    const T* row = back + i * g.PW;
    for (int64_t j = 0; j < nb; ++j) g.gz[(b0 + j) * g.d + i] = row[j];
    if (g.gprobe)
      for (int64_t j = 0; j < nb; ++j) g.gprobe[(b0 + j) * g.d + i] += row[g.TB + j];
  }
}

template <typename T, FieldAct ACT>
void backward_tiles_act(const FieldBackCall<T>& g, int64_t begin, int64_t end, const FieldBackScratch<T>& s) {
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t b0 = tile * g.TB, nb = std::min(g.TB, g.B - b0);
    T* adj = s.adj;
    T* back = s.back;
    last_adjoint(g.layers[g.n_layers - 1], g, b0, nb, adj, s.acc);
    for (int64_t l = g.n_layers - 1; l >= 1; --l) {
      const FieldBackLayer<T>& layer = g.layers[l];
      const FieldBackLayer<T>& prev = g.layers[l - 1];
      hidden_inputs<T, ACT>(prev.fwd, g, b0, nb, s);
      layer_weight_grad(layer, g, adj, s.input, g.PW, s);
      layer_transposed_product(layer, g, adj, g.PW, back);
      hidden_adjoint(prev, g, b0, nb, back, s);
      std::swap(adj, back);
    }
    first_layer(g.layers[0], g, b0, nb, adj, back, s);
  }
}

template <typename T>
void backward_tiles(const FieldBackCall<T>& g, int64_t begin, int64_t end, const FieldBackScratch<T>& s) {
  using A = FieldAct;
  switch (g.act) {
    case A::Identity: return backward_tiles_act<T, A::Identity>(g, begin, end, s);
    case A::Tanh: return backward_tiles_act<T, A::Tanh>(g, begin, end, s);
    case A::Relu: return backward_tiles_act<T, A::Relu>(g, begin, end, s);
    case A::Softplus: return backward_tiles_act<T, A::Softplus>(g, begin, end, s);
    case A::Sigmoid: return backward_tiles_act<T, A::Sigmoid>(g, begin, end, s);
    case A::Elu: return backward_tiles_act<T, A::Elu>(g, begin, end, s);
    case A::Swish: return backward_tiles_act<T, A::Swish>(g, begin, end, s);
  }
}

inline FieldBackwardKernels make_field_backward_table(const char* name) {
  return FieldBackwardKernels{name, {&backward_tiles<float>}, {&backward_tiles<double>}};
}

}  // namespace sparseode::cpu::FIELD_VARIANT::backward
