// The at::Tensor entry points of the CPU kernels (spmm_cpu.h): argument checks, contiguous inputs
// and outputs, then the raw-pointer kernels of the variant chosen for this CPU (dispatch.h).
#include "spmm_cpu.h"

#include "../common.h"
#include "dispatch.h"

namespace sparseode::cpu {
namespace {

// The kernel of `k` for the argument type (float or double).
void run(const KernelTable& k, const SpmmArgs<float>& a) { k.spmm_f32(a); }
void run(const KernelTable& k, const SpmmArgs<double>& a) { k.spmm_f64(a); }
void run(const KernelTable& k, const SddmmArgs<float>& a) { k.sddmm_f32(a); }
void run(const KernelTable& k, const SddmmArgs<double>& a) { k.sddmm_f64(a); }

// The spmm of the active variant on contiguous tensors; act_cols < 0: batch-major x (B, K) ->
// y (B, N), else feature-major x (K, B) -> y (N, B).
template <typename T>
void run_spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
              const at::Tensor& bias, Activation act, int64_t act_cols, int64_t N, BlockShape bs, at::Tensor& y) {
  const bool fm = act_cols >= 0;
  const SpmmArgs<T> args{x.data_ptr<T>(), values.data_ptr<T>(), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                         bias.defined() ? bias.data_ptr<T>() : nullptr, act, act_cols,
                         fm ? x.size(1) : x.size(0), fm ? x.size(0) : x.size(1), N, bs.bh, bs.bw, y.data_ptr<T>()};
  run(active_kernels(), args);
}

}  // namespace

at::Tensor bsr_spmm(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& crow,
                    const at::Tensor& col, const c10::optional<at::Tensor>& bias, std::string_view activation) {
  check_spmm_args(x_in, values_in, crow, col, bias);
  CHECK_DEVICE_TYPE(x_in, at::kCPU);
  CHECK_FLOATING(x_in);
  const Activation act = parse_activation(activation);
  const auto bs = block_shape_of(values_in);
  TORCH_CHECK(x_in.size(1) % bs.bw == 0, "x has ", x_in.size(1), " features, not a multiple of the block width ",
              bs.bw);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const int64_t N = (crow.size(0) - 1) * bs.bh;
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0 || N == 0) return y;
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsr_spmm_cpu",
                             [&] { run_spmm<scalar_t>(x, values, crow_c, col_c, bias_c, act, -1, N, bs, y); });
  return y;
}

at::Tensor bsr_spmm_fm(const at::Tensor& xT_in, const at::Tensor& values_in, const at::Tensor& crow,
                       const at::Tensor& col, const c10::optional<at::Tensor>& bias, std::string_view activation,
                       int64_t act_cols) {
  check_spmm_args(xT_in.t(), values_in, crow, col, bias);
  CHECK_DEVICE_TYPE(xT_in, at::kCPU);
  CHECK_FLOATING(xT_in);
  TORCH_CHECK(act_cols >= 0, "act_cols must be >= 0, got ", act_cols);
  const Activation act = parse_activation(activation);
  const auto bs = block_shape_of(values_in);
  TORCH_CHECK(xT_in.size(0) % bs.bw == 0, "xT has ", xT_in.size(0), " features, not a multiple of the block width ",
              bs.bw);
  const at::Tensor xT = xT_in.contiguous(), values = values_in.contiguous();
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const int64_t N = (crow.size(0) - 1) * bs.bh;
  at::Tensor yT = at::empty({N, xT.size(1)}, xT.options());
  if (xT.size(1) == 0 || N == 0) return yT;
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(xT.scalar_type(), "bsr_spmm_fm_cpu",
                             [&] { run_spmm<scalar_t>(xT, values, crow_c, col_c, bias_c, act, act_cols, N, bs, yT); });
  return yT;
}

at::Tensor bsr_spmm_t(const at::Tensor& g, const at::Tensor& values, const at::Tensor& crow_t,
                      const at::Tensor& col_t, const at::Tensor& perm) {
  CHECK_INDEX(perm);
  TORCH_CHECK(perm.size(0) == values.size(0), "perm holds ", perm.size(0), " entries for ", values.size(0),
              " stored blocks");
  at::Tensor values_t = values.index_select(0, perm);
  if (values_t.dim() == 3) values_t = values_t.transpose(1, 2).contiguous();
  return bsr_spmm(g, values_t, crow_t, col_t, c10::nullopt, "identity");
}

at::Tensor bsr_sddmm(const at::Tensor& a, const at::Tensor& c, const at::Tensor& crow, const at::Tensor& col,
                     int64_t bh, int64_t bw) {
  CHECK_DIM(a, 2);
  CHECK_DIM(c, 2);
  CHECK_INDEX(crow);
  CHECK_INDEX(col);
  CHECK_SAME_DTYPE(a, c);
  CHECK_DEVICE_TYPE(a, at::kCPU);
  CHECK_SAME_DEVICE(a, c);
  CHECK_FLOATING(a);
  TORCH_CHECK(a.size(0) == c.size(0), "a and c must share the batch size, got ", a.size(0), " and ", c.size(0));
  TORCH_CHECK(bh >= 1 && bw >= 1, "block sizes must be positive, got ", bh, "x", bw);
  TORCH_CHECK(a.size(1) == (crow.size(0) - 1) * bh, "a has ", a.size(1), " columns but the pattern has ",
              (crow.size(0) - 1) * bh, " rows");
  TORCH_CHECK(c.size(1) % bw == 0, "c has ", c.size(1), " columns, not a multiple of the block width ", bw);
  const int64_t nnz = col.size(0);
  at::Tensor out = (bh == 1 && bw == 1) ? at::empty({nnz}, a.options()) : at::empty({nnz, bh, bw}, a.options());
  if (nnz == 0) return out;
  const at::Tensor aT = a.t().contiguous();
  const at::Tensor cT = c.t().contiguous();
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bsr_sddmm_cpu", [&] {
    const SddmmArgs<scalar_t> args{aT.data_ptr<scalar_t>(), cT.data_ptr<scalar_t>(), crow_c.data_ptr<int64_t>(),
                                   col_c.data_ptr<int64_t>(), aT.size(1), crow.size(0) - 1, bh, bw,
                                   out.data_ptr<scalar_t>()};
    run(active_kernels(), args);
  });
  return out;
}

}  // namespace sparseode::cpu
