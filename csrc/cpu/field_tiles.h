// The tile-level parts of the fused field's forward, compiled once per instruction-set variant
// (field_<variant>.cpp include this under `#pragma GCC target`, after the same headers as
// field_kernels.h, which it includes): input packing, the dense first layer, the last layer, the
// non-finite check, the loop over a thread's tiles and the variant's table. Raw pointers only.
#include "field_kernels.h"

namespace sparseode::cpu::FIELD_VARIANT {

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

// The dense first layer (K = D, the state size) of a tile whose 1 + m groups fit one pass: the D input
// rows stay in registers for all N rows (hidden_pass would reload them per row), and with the exact
// trace (UNIT) the tangents are the unit vectors, so W T_q is W's column q - 1 on every column: no
// products for them (padding columns get it too; no output reads them).
template <typename T, FieldAct ACT, int G, int NV, int D, bool UNIT>
void first_rows(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, T* y, int64_t b0, int64_t nb) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>, TB = NV * L;
  constexpr int GX = UNIT ? 1 : G;  // groups read from the input panel
  static_assert(!UNIT || G == 1 + D, "the exact trace has one tangent group per state feature");
  V xr[D][GX][NV];
#pragma GCC unroll 4
  for (int k = 0; k < D; ++k)
#pragma GCC unroll 4
    for (int q = 0; q < GX; ++q)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xr[k][q][v] = load(x + k * g.PW + q * TB + v * L);
  for (int64_t n = 0; n < layer.N; ++n) {
    const T* w = layer.w + n * D;
    V acc[G][NV];
#pragma GCC unroll 4
    for (int q = 0; q < GX; ++q)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        V a = splat(w[0]) * xr[0][q][v];  // as accumulate's first multiply-add onto zero
#pragma GCC unroll 4
        for (int k = 1; k < D; ++k) a += splat(w[k]) * xr[k][q][v];
        acc[q][v] = a;
      }
    if constexpr (UNIT) {
#pragma GCC unroll 4
      for (int q = 1; q < G; ++q)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[q][v] = splat(w[q - 1]);
    }
    pass_epilogue<T, ACT, G, NV, true, false>(layer, g, n, y, 0, b0, nb, nullptr, acc);
  }
}

// first_rows for the call's trace; false where its groups do not fit one pass.
template <typename T, FieldAct ACT, int NV, int D>
bool first_rows_d(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, T* y, int64_t b0, int64_t nb) {
  constexpr int GP = kPassGroups<NV>;
  if (g.trace == 0) {
    first_rows<T, ACT, 1, NV, D, false>(layer, g, x, y, b0, nb);
  } else if (g.trace == 2) {
    if constexpr (GP >= 2) {
      first_rows<T, ACT, 2, NV, D, false>(layer, g, x, y, b0, nb);
    } else {
      return false;
    }
  } else {
    if constexpr (GP >= 1 + D) {
      first_rows<T, ACT, 1 + D, NV, D, true>(layer, g, x, y, b0, nb);
    } else {
      return false;
    }
  }
  return true;
}

// The first layer of a tile: first_rows where it applies (dense, state size 1 to 3, one pass per
// row), else the hidden layers' row loop.
template <typename T, FieldAct ACT, int NV>
void first_layer(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, T* y, int64_t b0, int64_t nb,
                 T* slope) {
  bool done = false;
  if (!layer.crow) {
    switch (g.d) {
      case 1: done = first_rows_d<T, ACT, NV, 1>(layer, g, x, y, b0, nb); break;
      case 2: done = first_rows_d<T, ACT, NV, 2>(layer, g, x, y, b0, nb); break;
      case 3: done = first_rows_d<T, ACT, NV, 3>(layer, g, x, y, b0, nb); break;
      default: break;
    }
  }
  if (!done) hidden_layer<T, ACT, NV>(layer, g, x, y, b0, nb, slope);
}

// Rows [n0, n0 + R) of a dense last layer in one sweep over its K input rows, so that each load of the
// state columns serves the R rows: row + (r BLOCKS + b) TB gets row n0 + r's products with the state
// columns (b = 0) and, with the trace (BLOCKS = 2), with the tangent block its trace reads.
template <typename T, int R, int BLOCKS, int NV>
void last_rows_dense(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, int64_t n0, T* row) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>, TB = NV * L;
  const int64_t K = layer.K, PW = g.PW;
  int64_t t0[R];  // exact: block 1 + n of row n; Hutchinson: the probe's block
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) t0[r] = g.trace == 1 ? TB * (1 + n0 + r) : TB;
  V acc[R][BLOCKS][NV] = {};
  const T* w = layer.w + n0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const T* xk = x + k * PW;
    V xs[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xs[v] = load(xk + v * L);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const V wv = splat(w[r * K + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        acc[r][0][v] += wv * xs[v];
        if constexpr (BLOCKS == 2) acc[r][1][v] += wv * load(xk + t0[r] + v * L);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int b = 0; b < BLOCKS; ++b)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) store(row + (r * BLOCKS + b) * TB + v * L, acc[r][b][v]);
}

// The products of the last layer's rows from n0 on, laid out as last_rows_dense's: a dense layer two
// rows at a time where the registers hold both rows' accumulators (and the state loads), a CSR one
// row by row. Returns the number of rows done.
template <typename T, int BLOCKS, int NV>
int64_t last_products(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, int64_t n0, T* row) {
  constexpr int64_t TB = NV * kLanes<T>;
  if (layer.crow) {
    layer_row(layer, n0, x, g.PW, 0, TB, row);
    const int64_t t0 = g.trace == 1 ? TB * (1 + n0) : TB;
    if constexpr (BLOCKS == 2) layer_row(layer, n0, x, g.PW, t0, t0 + TB, row + TB);
    return 1;
  }
  constexpr int kRegisters = FIELD_VEC_BYTES == 64 ? 32 : 16;
  constexpr int R = 2 * BLOCKS * NV + NV <= kRegisters ? 2 : 1;
  if (R == 2 && n0 + 2 <= g.d) {
    last_rows_dense<T, R, BLOCKS, NV>(layer, g, x, n0, row);
    return R;
  }
  last_rows_dense<T, 1, BLOCKS, NV>(layer, g, x, n0, row);
  return 1;
}

// The last layer on the panel x: f rows and the trace term for the tile's columns.
template <typename T, int NV>
void last_layer(const FieldLayer<T>& layer, const FieldCall<T>& g, const T* x, int64_t b0, int64_t nb, T* row) {
  constexpr int64_t TB = NV * kLanes<T>;
  const int64_t blocks = g.trace ? 2 : 1;
  for (int64_t n0 = 0; n0 < g.d;) {
    const int64_t rows = blocks == 2 ? last_products<T, 2, NV>(layer, g, x, n0, row)
                                     : last_products<T, 1, NV>(layer, g, x, n0, row);
    for (int64_t n = n0; n < n0 + rows; ++n) {
      const T* prod = row + (n - n0) * blocks * TB;  // state columns, then the trace's block
      const T s = layer.scale ? layer.scale[n] : T(1), c = layer.shift ? layer.shift[n] : T(0);
      for (int64_t j = 0; j < nb; ++j) g.f[(b0 + j) * g.d + n] = s * prod[j] + c;
      if (g.trace == 1) {
        for (int64_t j = 0; j < nb; ++j) g.trace_out[b0 + j] += s * prod[TB + j];
      } else if (g.trace == 2) {
        for (int64_t j = 0; j < nb; ++j) g.trace_out[b0 + j] += g.probe[(b0 + j) * g.d + n] * s * prod[TB + j];
      }
      if (layer.saved)
        for (int64_t q = 0; q < layer.groups; ++q)
          std::copy_n(prod + q * TB, nb, layer.saved + (n * layer.groups + q) * g.B + b0);
    }
    n0 += rows;
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

// Tiles [begin, end) of a call: NV vectors of batch columns per tile (TB = NV lanes).
template <typename T, FieldAct ACT, int NV>
void tiles_nv(const FieldCall<T>& g, int64_t begin, int64_t end, const FieldScratch<T>& s) {
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t b0 = tile * g.TB, nb = std::min(g.TB, g.B - b0);
    T* x = s.a;
    T* y = s.b;
    pack_input(g, b0, nb, x);
    for (int64_t l = 0; l + 1 < g.n_layers; ++l) {
      if (l == 0) {
        first_layer<T, ACT, NV>(g.layers[l], g, x, y, b0, nb, s.row);
      } else {
        hidden_layer<T, ACT, NV>(g.layers[l], g, x, y, b0, nb, s.row);
      }
      std::swap(x, y);
    }
    last_layer<T, NV>(g.layers[g.n_layers - 1], g, x, b0, nb, s.row);
    poison_nonfinite(g, b0, nb);
  }
}

template <typename T, FieldAct ACT>
void tiles_act(const FieldCall<T>& g, int64_t begin, int64_t end, const FieldScratch<T>& s) {
  switch (g.TB / kLanes<T>) {
    case 1: return tiles_nv<T, ACT, 1>(g, begin, end, s);
    case 2: return tiles_nv<T, ACT, 2>(g, begin, end, s);
    default: return tiles_nv<T, ACT, 4>(g, begin, end, s);
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

inline FieldKernels make_field_table(const char* name) {
  return FieldKernels{name,
                      kLanes<float>,
                      kLanes<double>,
                      {&tiles<float>},
                      {&tiles<double>}};
}

}  // namespace sparseode::cpu::FIELD_VARIANT
