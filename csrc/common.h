// Checks and small helpers shared by the CPU and CUDA kernels of sparseode.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string_view>

#define CHECK_DIM(t, d) \
  TORCH_CHECK((t).dim() == (d), #t " must be " #d "-D, got shape ", (t).sizes())
#define CHECK_SAME_DTYPE(a, b)                                                             \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " has dtype ", (a).scalar_type(), \
              " but " #b " has dtype ", (b).scalar_type())
#define CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device())
#define CHECK_INDEX(t) \
  TORCH_CHECK((t).scalar_type() == at::kLong && (t).dim() == 1, #t " must be a 1-D int64 tensor")
#define CHECK_DEVICE_TYPE(t, dev) \
  TORCH_CHECK((t).device().type() == (dev), #t " must be on ", (dev), ", got ", (t).device())
#define CHECK_FLOATING(t)                                                                       \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,             \
              #t " must be float32 or float64 on this backend, got ", (t).scalar_type())

namespace sparseode {

// Activation applied in the epilogue of spmm (inference path). The order is the contract with
// sparseode/ops/registry.py's ACTIVATIONS.
enum class Activation : int { Identity = 0, Tanh, Relu, Softplus, Sigmoid, Elu };

inline Activation parse_activation(std::string_view name) {
  if (name == "identity") return Activation::Identity;
  if (name == "tanh") return Activation::Tanh;
  if (name == "relu") return Activation::Relu;
  if (name == "softplus") return Activation::Softplus;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "elu") return Activation::Elu;
  TORCH_CHECK(false, "activation must be one of identity, tanh, relu, softplus, sigmoid, elu; got '",
              std::string(name), "'");
}

// Block geometry of a block-sparse weight: values are (nnz_blocks, bh, bw); CSR is bh = bw = 1
// with values of shape (nnz,).
struct BlockShape {
  int64_t bh;
  int64_t bw;
};

inline BlockShape block_shape_of(const at::Tensor& values) {
  TORCH_CHECK(values.dim() == 1 || values.dim() == 3,
              "values must be (nnz,) for CSR or (nnz_blocks, bh, bw) for BSR, got shape ", values.sizes());
  if (values.dim() == 1) return {1, 1};
  return {values.size(1), values.size(2)};
}

// Shared argument checks of the spmm kernel: x (B, K), pattern (crow, col), values, bias.
inline void check_spmm_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                            const at::Tensor& col, const c10::optional<at::Tensor>& bias) {
  CHECK_DIM(x, 2);
  CHECK_INDEX(crow);
  CHECK_INDEX(col);
  CHECK_SAME_DTYPE(x, values);
  CHECK_SAME_DEVICE(x, values);
  CHECK_SAME_DEVICE(x, crow);
  CHECK_SAME_DEVICE(x, col);
  TORCH_CHECK(values.size(0) == col.size(0), "values holds ", values.size(0), " blocks but col holds ",
              col.size(0));
  TORCH_CHECK(crow.size(0) >= 1, "crow must hold at least one entry");
  if (bias.has_value()) {
    CHECK_SAME_DTYPE(x, (*bias));
    CHECK_SAME_DEVICE(x, (*bias));
    const auto bs = block_shape_of(values);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == (crow.size(0) - 1) * bs.bh, "bias must have shape (",
                (crow.size(0) - 1) * bs.bh, ",), got ", bias->sizes());
  }
}

}  // namespace sparseode
