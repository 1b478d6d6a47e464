// The fused MLP vector field on the CPU: every layer of a (sparsified) MLPVectorField in one call,
// batch tile by batch tile, with the tangent columns of the forward-mode trace carried along.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "field_table.h"

namespace sparseode::cpu {

// The FieldAct of an activation name; a clear error for any other name (shared with the backward).
FieldAct parse_field_activation(std::string_view name);

// Per-layer (N_l, K_l) of the field's layers (arguments as mlp_field's below), after checking their
// dtypes, devices, CSR pattern sizes and scale/shift shapes and that the layers chain from z's d back
// to d; a clear error naming the argument otherwise (shared with the backward).
std::vector<std::pair<int64_t, int64_t>> check_field_layers(const at::Tensor& z, at::TensorList weights,
                                                            at::TensorList patterns,
                                                            const c10::List<std::optional<at::Tensor>>& scales,
                                                            const c10::List<std::optional<at::Tensor>>& shifts);

// Layer l computes pre_l = scale_l * (W_l h_{l-1}) + shift_l and h_l = act(pre_l) (the last layer
// stops at pre: f = pre_L). z (B, d); weights[l] is a dense (N_l, K_l) weight or the (nnz,) values
// of a CSR weight whose pattern takes the next 5 entries of `patterns` (crow, col, crow_t, col_t,
// perm: the transposed half is used only by the backward and to check K_l). scales/shifts: (N_l,)
// or None. trace: 0 none, 1 exact (the d unit vectors as tangents, built inside each tile), 2
// Hutchinson with the probe `probe` (B, d). Returns f (B, d), the trace term (B,) (sum_i [J e_i]_i
// or e^T J e; zeros for trace 0), and, when `save`, per layer the feature-major products the
// backward needs: hidden layers (N_l, 1 + m, B) = [W h | W T_1 | ... | W T_m] (m tangents), the last
// (d, 1 + (trace > 0), B) = [W h | the rows of W T the trace reads]. A sample whose state holds NaN or
// Inf gets NaN in f and in the trace.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_field(
    const at::Tensor& z, const std::optional<at::Tensor>& probe, at::TensorList weights, at::TensorList patterns,
    const c10::List<std::optional<at::Tensor>>& scales, const c10::List<std::optional<at::Tensor>>& shifts,
    std::string_view activation, int64_t trace, bool save);

}  // namespace sparseode::cpu
