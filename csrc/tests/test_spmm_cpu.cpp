// C++ test of the CPU kernels against dense ATen products (run by ctest; no Python involved).
#include <ATen/ATen.h>

#include <cstdio>
#include <string>

#include "cpu/dispatch.h"
#include "cpu/spmm_cpu.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what, double tol) {
  const bool ok = got.sizes() == want.sizes() && at::allclose(got, want, tol, tol, /*equal_nan=*/true);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Block-sparse pattern of `mask` (N, K) for blocks (bh, bw): crow, col and the dense block mask.
struct Pattern {
  at::Tensor crow, col, crow_t, col_t, perm, kept;  // kept: (N/bh, K/bw) bool
};

Pattern pattern_of(const at::Tensor& block_kept) {
  Pattern p;
  p.kept = block_kept;
  const auto idx = block_kept.nonzero();
  const auto rows = idx.select(1, 0).contiguous(), cols = idx.select(1, 1).contiguous();
  const int64_t nr = block_kept.size(0), nc = block_kept.size(1);
  p.crow = at::zeros({nr + 1}, at::kLong);
  p.crow.narrow(0, 1, nr).copy_(at::bincount(rows, {}, nr).cumsum(0));
  p.col = cols;
  p.perm = at::argsort(cols * nr + rows);
  p.crow_t = at::zeros({nc + 1}, at::kLong);
  p.crow_t.narrow(0, 1, nc).copy_(at::bincount(cols, {}, nc).cumsum(0));
  p.col_t = rows.index_select(0, p.perm).contiguous();
  return p;
}

void run_case(int64_t B, int64_t N, int64_t K, int64_t bh, int64_t bw, double density, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype);
  const auto x = at::randn({B, K}, opts), g = at::randn({B, N}, opts);
  const auto bias = at::randn({N}, opts);
  const auto block_kept = at::rand({N / bh, K / bw}) < density;
  const Pattern p = pattern_of(block_kept);
  const auto dense_mask = block_kept.repeat_interleave(bh, 0).repeat_interleave(bw, 1);
  const auto w = at::randn({N, K}, opts) * dense_mask.to(dtype);
  // stored values: (nnz,) for CSR, (nnz, bh, bw) blocks for BSR
  const auto rows = block_kept.nonzero().select(1, 0), cols = block_kept.nonzero().select(1, 1);
  at::Tensor values = w.reshape({N / bh, bh, K / bw, bw}).permute({0, 2, 1, 3}).index({rows, cols}).contiguous();
  if (bh == 1 && bw == 1) values = values.reshape({-1});

  const std::string tag = std::to_string(B) + "x" + std::to_string(K) + "->" + std::to_string(N) + " block " +
                          std::to_string(bh) + "x" + std::to_string(bw) + " " + std::string(c10::toString(dtype));
  const double tol = dtype == at::kFloat ? 1e-4 : 1e-10;
  expect_close(sparseode::cpu::bsr_spmm(x, values, p.crow, p.col, bias, "identity"), at::linear(x, w, bias),
               "spmm " + tag, tol);
  expect_close(sparseode::cpu::bsr_spmm(x, values, p.crow, p.col, bias, "tanh"), at::tanh(at::linear(x, w, bias)),
               "spmm+tanh " + tag, tol);
  expect_close(sparseode::cpu::bsr_spmm_t(g, values, p.crow_t, p.col_t, p.perm), at::matmul(g, w), "spmm_t " + tag,
               tol);
  at::Tensor full = at::matmul(g.t(), x).reshape({N / bh, bh, K / bw, bw}).permute({0, 2, 1, 3}).index({rows, cols});
  if (bh == 1 && bw == 1) full = full.reshape({-1});
  expect_close(sparseode::cpu::bsr_sddmm(g, x, p.crow, p.col, bh, bw), full, "sddmm " + tag, tol * 10);
}

}  // namespace

// argv[1]: the variant the run should use (ctest sets SPARSEODE_CPU_CAPABILITY to it). Where the CPU
// lacks it the dispatcher runs a narrower one: exit 77, which ctest reports as skipped.
int main(int argc, char** argv) {
  const std::string ran = sparseode::cpu::cpu_capability();
  std::printf("CPU kernel variant: %s\n", ran.c_str());
  if (argc > 1 && ran != argv[1]) {
    std::printf("skipped: asked for '%s' but this CPU runs '%s'\n", argv[1], ran.c_str());
    return 77;
  }
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    run_case(1, 1, 1, 1, 1, 1.0, dtype);
    run_case(33, 257, 63, 1, 1, 0.2, dtype);
    run_case(1000, 3, 1000, 1, 1, 0.3, dtype);
    run_case(70, 64, 48, 16, 16, 0.3, dtype);
    run_case(9, 24, 20, 4, 5, 0.5, dtype);
    run_case(130, 32, 32, 8, 8, 0.0, dtype);
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
