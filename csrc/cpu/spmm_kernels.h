// The spmm kernels (y = act(x W^T + bias), batch- and feature-major), written once and compiled
// once per instruction-set variant: csrc/cpu/variants/*.cpp define SPARSEODE_CPU_VARIANT (the
// namespace), SPARSEODE_CPU_VEC_BYTES (the vector width) and SPARSEODE_CPU_AVX (AVX transposes).
// Threads split the work over batch tiles and block rows; inside a task the batch tile is
// transposed once into a feature-major buffer so that every inner loop is a contiguous multiply-add
// across the batch, which the compiler vectorises.
#pragma once

#include "kernel_prelude.h"
#include "transpose.h"

namespace sparseode::cpu::SPARSEODE_CPU_VARIANT {

// Accumulator budget per micro-tile in elements: 8 AVX2 registers, or 16 of AVX-512's 32 registers
// (with 4 only, a 4-row BSR micro-tile broadcast more weights than it loaded x vectors).
template <typename T>
constexpr int kAccum = (SPARSEODE_CPU_VEC_BYTES == 64 ? 256 : 64) / static_cast<int>(sizeof(T) / sizeof(float));
// Widest batch tile: 4 AVX-512 registers of float.
constexpr int kMaxTile = 64;

// Copies batch rows [b0, b0 + nb) of x (B, K) into xT (K, TB), zero-padding columns nb..TB.
// Returns true when a copied value is NaN or +-Inf, and marks which rows in `nonfinite`.
template <typename T, int TB>
bool pack_tile(const T* x, int64_t K, int64_t b0, int64_t nb, T* xT, bool* nonfinite) {
  const bool maybe = transpose(x + b0 * K, K, xT, TB, nb, K);
  if (nb < TB)
    for (int64_t k = 0; k < K; ++k)
      for (int j = nb; j < TB; ++j) xT[k * TB + j] = T(0);
  bool any = false;
  for (int j = 0; j < TB; ++j) {
    nonfinite[j] = false;
    if (!maybe || j >= nb) continue;
    const T* row = x + (b0 + j) * K;
    for (int64_t k = 0; k < K && !nonfinite[j]; ++k) nonfinite[j] = !std::isfinite(row[k]);
    any = any || nonfinite[j];
  }
  return any;
}

// Bytes of one SIMD vector of the variant: 64 (one AVX-512 register), 32 (one AVX register) or 16
// (one SSE register, the baseline variant).
constexpr int kVecBytes = SPARSEODE_CPU_VEC_BYTES;

// One SIMD vector of T.
// (A vector_size attribute on a dependent alias template is dropped by gcc, hence the traits.)
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = kVecBytes / sizeof(T);

template <typename T>
inline Vec<T> splat(T s) {
  return Vec<T>{} + s;  // vector + scalar broadcasts the scalar (one vbroadcastss)
}

// out[i * stride + j] = act(out[i * stride + j] + bias[i]) for i < rows, j < width.
template <typename T, Activation ACT>
void epilogue(T* out, const T* bias, int rows, int width, int stride) {
  for (int i = 0; i < rows; ++i) {
    const T b = bias ? bias[i] : T(0);
    T* row = out + i * stride;
    for (int j = 0; j < width; ++j) row[j] = activate<T, ACT>(row[j] + b);
  }
}

// yT rows for block rows [r0, r1): yT[(r - r0) * bh + i][j] = sum over blocks p of row r,
// c < bw of values[p][i][c] * xT[col[p] * bw + c][j].  R rows of a block and JW batch columns are
// accumulated in registers at a time; when that leaves registers free (narrow tiles), P partial sums
// over alternating blocks break the dependency chain of the multiply-adds. Bias and activation are
// applied to each micro-tile while it is still in L1.
// Where a task reads its feature-major batch tile and writes its output rows: x row k of the tile
// at x + k * ld_x, output row o at y + (o - row_base) * ld_y. Bias and activation apply to the
// first act_cols columns of the tile (the rest, e.g. tangent directions, get neither).
template <typename T>
struct TileIO {
  const T* x;
  int64_t ld_x;
  T* y;
  int64_t ld_y;
  int64_t row_base;
  int act_cols;
};

// BWC is the block width when known at compile time (1 for CSR: no inner column loop), else 0.
template <typename T, int TB, int R, int BWC>
void block_rows(const TileIO<T>& io, const T* __restrict values, const int64_t* crow, const int64_t* col,
                const T* bias, Activation act, int64_t bh, int64_t bw_runtime, int64_t r0, int64_t r1) {
  const int64_t bw = BWC > 0 ? BWC : bw_runtime;
  const T* __restrict xT = io.x;
  const int64_t ld_x = io.ld_x, ld_y = io.ld_y;
  using V = Vec<T>;
  constexpr int JW = std::min(TB, kAccum<T> / R);
  constexpr int NV = JW / kLanes<T>;
  constexpr int P = std::max(1, kAccum<T> / (R * JW));
  static_assert(NV >= 1 && JW % kLanes<T> == 0, "batch tile must hold whole vectors");
  const int64_t bsize = bh * bw;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p_begin = crow[r], p_end = crow[r + 1];
    for (int64_t i0 = 0; i0 < bh; i0 += R) {
      for (int jb = 0; jb < TB; jb += JW) {
        V acc[P][R][NV];
#pragma GCC unroll 8
        for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
            for (int n = 0; n < NV; ++n) acc[q][i][n] = V{};
        // Adds block p into partial sum q.
        auto add_block = [&](int q, int64_t p) __attribute__((always_inline)) {
          const T* vblock = values + p * bsize + i0 * bw;
          const T* xcol = xT + col[p] * bw * ld_x + jb;
          for (int64_t c = 0; c < bw; ++c) {
            V xv[NV];
#pragma GCC unroll 8
            for (int n = 0; n < NV; ++n) std::memcpy(&xv[n], xcol + c * ld_x + n * kLanes<T>, sizeof(V));
#pragma GCC unroll 8
            for (int i = 0; i < R; ++i) {
              const V v = splat(vblock[i * bw + c]);
#pragma GCC unroll 8
              for (int n = 0; n < NV; ++n) acc[q][i][n] += v * xv[n];
            }
          }
        };
        int64_t p = p_begin;
        for (; p + P <= p_end; p += P) {
#pragma GCC unroll 8
          for (int q = 0; q < P; ++q) add_block(q, p + q);
        }
        for (; p < p_end; ++p) add_block(0, p);
#pragma GCC unroll 8
        for (int q = 1; q < P; ++q)
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
            for (int n = 0; n < NV; ++n) acc[0][i][n] += acc[q][i][n];
        T* out = io.y + (r * bh + i0 - io.row_base) * ld_y + jb;
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
          for (int n = 0; n < NV; ++n) std::memcpy(out + i * ld_y + n * kLanes<T>, &acc[0][i][n], sizeof(V));
        const T* row_bias = bias ? bias + r * bh + i0 : nullptr;
        const int width = std::clamp(io.act_cols - jb, 0, JW);
        if (width > 0)
          dispatch_activation(act, [&](auto tag) { epilogue<T, decltype(tag)::value>(out, row_bias, R, width, ld_y); });
      }
    }
  }
}

// Dense semantics for non-finite inputs: y[b, o] is NaN when x[b, k] is NaN/Inf at a column k that
// row o does not store (0 * Inf = NaN in the dense product). Stored columns already went through the
// arithmetic. Runs only for tiles that hold a non-finite value, after the epilogue (every
// activation maps NaN to NaN).
template <typename T, int TB>
void poison_nonfinite(const TileIO<T>& io, const bool* nonfinite, const int64_t* crow, const int64_t* col, int64_t K,
                      int64_t bh, int64_t bw, int64_t r0, int64_t r1) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int j = 0; j < TB; ++j) {
    if (!nonfinite[j]) continue;
    for (int64_t k = 0; k < K; ++k) {
      if (std::isfinite(io.x[k * io.ld_x + j])) continue;
      const int64_t kb = k / bw;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t* begin = col + crow[r];
        const int64_t* end = col + crow[r + 1];
        // columns are sorted within a row (formats.py builds them so)
        if (std::binary_search(begin, end, kb)) continue;
        for (int64_t i = 0; i < bh; ++i) io.y[(r * bh + i - io.row_base) * io.ld_y + j] = nan;
      }
    }
  }
}

// Runs the block-row kernel for block rows [r0, r1) of one batch tile, picking the register
// tiling (rows per micro-tile R, compile-time block width) from the block shape.
template <typename T, int TB>
void run_rows(const TileIO<T>& io, const T* values, const int64_t* crow, const int64_t* col, const T* bias,
              Activation act, int64_t bh, int64_t bw, int64_t r0, int64_t r1) {
  const auto rows = [&](auto r_tag, auto bw_tag) {
    block_rows<T, TB, decltype(r_tag)::value, decltype(bw_tag)::value>(io, values, crow, col, bias, act, bh, bw, r0,
                                                                        r1);
  };
  using I = std::integral_constant<int, 0>;
  if (bh == 1 && bw == 1) {
    rows(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{});
  } else if (bh % 4 == 0 && bw == 16) {
    rows(std::integral_constant<int, 4>{}, std::integral_constant<int, 16>{});
  } else if (bh % 4 == 0 && bw == 32) {
    rows(std::integral_constant<int, 4>{}, std::integral_constant<int, 32>{});
  } else if (bh % 4 == 0) {
    rows(std::integral_constant<int, 4>{}, I{});
  } else if (bh % 2 == 0) {
    rows(std::integral_constant<int, 2>{}, I{});
  } else {
    rows(std::integral_constant<int, 1>{}, I{});
  }
}

// A growable array owned by this variant (std::vector's out-of-line members would be shared across
// variants by the linker: see kernel_prelude.h).
template <typename T>
class Buffer {
 public:
  T* data() { return data_.get(); }
  // Grows to at least n elements; contents are not kept.
  void reserve(size_t n) {
    if (n > size_) {
      data_.reset(new T[n]);
      size_ = n;
    }
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t size_ = 0;
};

// Per-thread scratch: a packed input tile and the output rows of a task.
template <typename T>
struct Scratch {
  Buffer<T> x, y;
};

// f(begin, end) over chunks of [0, n) on the threads, through the baseline hook of kernel_table.h.
template <typename F>
void parallel_range(int64_t n, int64_t grain, F&& f) {
  using Fn = std::remove_reference_t<F>;
  parallel_for(n, grain, [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); }, &f);
}

// Splits the work into (batch tile of TB columns) x (chunk of block rows) tasks over the threads and
// calls task(b0, nb, r0, r1, scratch) for each: columns [b0, b0 + nb), block rows [r0, r1).
template <typename T, int TB, typename Task>
void for_each_task(int64_t B, int64_t n_brows, int64_t work, Task&& task) {
  const int64_t n_tiles = (B + TB - 1) / TB;
  const int64_t threads = num_threads();
  // With fewer batch tiles than threads, block rows are split too.
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>((threads + n_tiles - 1) / n_tiles, n_brows));
  const int64_t rows_per_chunk = (n_brows + n_chunks - 1) / n_chunks;
  const int64_t n_tasks = n_tiles * n_chunks;
  // Problems this small finish faster on the calling thread than waking the pool.
  const int64_t grain = work < (1 << 15) ? n_tasks : 1;
  parallel_range(n_tasks, grain, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = (t % n_chunks) * rows_per_chunk;
      const int64_t r1 = std::min(n_brows, r0 + rows_per_chunk);
      const int64_t b0 = (t / n_chunks) * TB;
      if (r0 < r1) task(b0, std::min<int64_t>(TB, B - b0), r0, r1, scratch);
    }
  });
}

// Batch-major: x (B, K) -> y (B, N); each task transposes its batch tile in and its output out.
template <typename T, int TB>
void spmm_tiles(const T* x, const T* values, const int64_t* crow, const int64_t* col, const T* bias,
                Activation act, int64_t B, int64_t K, int64_t N, int64_t bh, int64_t bw, T* y) {
  const int64_t n_brows = N / bh;
  const int64_t work = B * (crow[n_brows] * bh * bw + K + N);
  for_each_task<T, TB>(B, n_brows, work, [&](int64_t b0, int64_t nb, int64_t r0, int64_t r1, Scratch<T>& s) {
    s.x.reserve(static_cast<size_t>(K) * TB);
    s.y.reserve(static_cast<size_t>((r1 - r0) * bh) * TB);
    bool nonfinite[TB];
    const bool any_nonfinite = pack_tile<T, TB>(x, K, b0, nb, s.x.data(), nonfinite);
    const TileIO<T> io{s.x.data(), TB, s.y.data(), TB, r0 * bh, TB};
    run_rows<T, TB>(io, values, crow, col, bias, act, bh, bw, r0, r1);
    if (any_nonfinite) poison_nonfinite<T, TB>(io, nonfinite, crow, col, K, bh, bw, r0, r1);
    transpose(s.y.data(), TB, y + b0 * N + r0 * bh, N, (r1 - r0) * bh, nb);
  });
}

// Marks the columns of a feature-major tile (K rows of TB values at stride ld) that hold NaN or Inf.
template <typename T, int TB>
bool find_nonfinite(const T* x, int64_t ld, int64_t K, bool* nonfinite) {
  T check[TB] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int j = 0; j < TB; ++j) check[j] += x[k * ld + j] * T(0);  // 0 unless NaN/Inf: exact
  bool any = false;
  for (int j = 0; j < TB; ++j) any |= (nonfinite[j] = check[j] != T(0));
  return any;
}

// Feature-major: xT (K, B) -> yT (N, B), no transposes. Full tiles are read and written in place;
// the last, partial tile goes through a zero-padded copy. Bias and activation apply to columns
// [0, act_cols) only.
template <typename T, int TB>
void spmm_fm_tiles(const T* xT, const T* values, const int64_t* crow, const int64_t* col, const T* bias,
                   Activation act, int64_t act_cols, int64_t B, int64_t K, int64_t N, int64_t bh, int64_t bw,
                   T* yT) {
  const int64_t n_brows = N / bh;
  const int64_t work = B * (crow[n_brows] * bh * bw + K + N);
  for_each_task<T, TB>(B, n_brows, work, [&](int64_t b0, int64_t nb, int64_t r0, int64_t r1, Scratch<T>& s) {
    const int tile_act = static_cast<int>(std::clamp<int64_t>(act_cols - b0, 0, TB));
    TileIO<T> io{xT + b0, B, yT + b0, B, 0, tile_act};
    if (nb < TB) {
      s.x.reserve(static_cast<size_t>(K) * TB);
      std::fill_n(s.x.data(), K * TB, T(0));
      s.y.reserve(static_cast<size_t>((r1 - r0) * bh) * TB);
      for (int64_t k = 0; k < K; ++k) std::copy_n(xT + k * B + b0, nb, s.x.data() + k * TB);
      io = TileIO<T>{s.x.data(), TB, s.y.data(), TB, r0 * bh, tile_act};
    }
    bool nonfinite[TB];
    const bool any_nonfinite = find_nonfinite<T, TB>(io.x, io.ld_x, K, nonfinite);
    run_rows<T, TB>(io, values, crow, col, bias, act, bh, bw, r0, r1);
    if (any_nonfinite) poison_nonfinite<T, TB>(io, nonfinite, crow, col, K, bh, bw, r0, r1);
    if (nb < TB)
      for (int64_t o = r0 * bh; o < r1 * bh; ++o) std::copy_n(s.y.data() + (o - r0 * bh) * TB, nb, yT + o * B + b0);
  });
}

// Batch tile: wide enough to fill the accumulators, narrow enough that the packed tile xT (K, TB)
// stays in L1 (random rows of it are read once per stored block; AVX-512: in a quarter of L2, as
// 16-lane registers need the wider tile to fill their accumulators), and no wider than a thread's share.
template <typename T>
int choose_tile(int64_t B, int64_t K) {
  constexpr int64_t kTileBytes = (SPARSEODE_CPU_VEC_BYTES == 64 ? 128 : 32) * 1024;
  const int64_t per_thread = (B + num_threads() - 1) / num_threads();
  int tb = 8;
  while (tb < std::min(kAccum<T>, kMaxTile) && tb < per_thread && int64_t(2 * tb) * K * int64_t(sizeof(T)) <= kTileBytes)
    tb *= 2;
  return tb;
}

// The spmm of kernel_table.h: picks the batch tile, then the batch- or feature-major walk.
template <typename T>
void spmm(const SpmmArgs<T>& a) {
  const auto launch = [&](auto tb_tag) {
    constexpr int TB = decltype(tb_tag)::value;
    if (a.act_cols >= 0) {
      spmm_fm_tiles<T, TB>(a.x, a.values, a.crow, a.col, a.bias, a.act, a.act_cols, a.B, a.K, a.N, a.bh, a.bw, a.y);
    } else {
      spmm_tiles<T, TB>(a.x, a.values, a.crow, a.col, a.bias, a.act, a.B, a.K, a.N, a.bh, a.bw, a.y);
    }
  };
  // tiles narrower than one register are rounded up to one register
  constexpr int L = kLanes<T>;
  switch (choose_tile<T>(a.B, a.K)) {
    case 8: launch(std::integral_constant<int, std::max(8, L)>{}); break;
    case 16: launch(std::integral_constant<int, std::max(16, L)>{}); break;
    case 32: launch(std::integral_constant<int, std::max(32, L)>{}); break;
    default: launch(std::integral_constant<int, std::min(kAccum<T>, kMaxTile)>{}); break;
  }
}

}  // namespace sparseode::cpu::SPARSEODE_CPU_VARIANT
