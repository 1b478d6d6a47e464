"""Sparse vector fields: ``FoldedConcatLinear`` (``ConcatLinear`` with its time column folded into
the bias: ``W[:, :d] x + (b + W[:, d] t)``, no concatenation per solver step) and
``SparseMLPField`` (an ``MLPVectorField`` on sparse layers that runs bias and activation in the
kernels' epilogue). Both join the forward-mode machinery of ``sparseode.models.forward_mode``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from sparseode.activations import ACTIVATIONS
from sparseode.models.forward_mode import (
    Affine,
    field_forward,
    forward_with_tangents,
    linear_matmul,
    linear_matmul_fm,
    scalar_time,
)
from sparseode.models.vector_field import ConcatLinear, MLPVectorField
from sparseode.nn.sparse_linear import SparseLinear
from sparseode.pruned import effective, kept_mask


class FoldedConcatLinear(nn.Module):
    """``ConcatLinear`` with its time column split off: ``y = inner(x) + (w_t * mask_t) t``.

    ``inner`` is an ``nn.Linear`` or ``SparseLinear`` over the ``in_features`` state columns (it
    holds the bias); ``time_weight`` (out,) is the time column, kept dense, with ``time_mask`` so a
    pruned time weight stays pruned through training. Shapes as ``ConcatLinear``.
    """

    def __init__(self, inner: nn.Module, time_weight: Tensor, time_mask: Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.time_weight = nn.Parameter(time_weight.detach().clone())
        self.register_buffer("time_mask", time_mask.detach().to(torch.bool).clone())

    @classmethod
    def from_concat(cls, layer: ConcatLinear,
                    make_inner: Callable[[nn.Linear, Tensor], nn.Module | None]) -> "FoldedConcatLinear | None":
        """Split ``layer``; ``make_inner(linear, mask)`` builds the state part from a dense Linear
        over the state columns and the kept mask of those columns (the layer's prune mask, else its
        nonzeros), or returns None to keep the layer as it is, and then so does this."""
        lin = layer.linear
        weight = effective(lin).detach()
        mask = kept_mask(lin)
        mask = weight != 0 if mask is None else mask
        d = layer.in_features
        state = nn.Linear(d, layer.out_features, bias=lin.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            state.weight.copy_(weight[:, :d])
            if lin.bias is not None:
                state.bias.copy_(lin.bias)
        inner = make_inner(state, mask[:, :d])
        return None if inner is None else cls(inner, weight[:, d], mask[:, d])

    def time_term(self) -> Tensor:
        return self.time_weight * self.time_mask

    def affine(self, t: Tensor | float, like: Tensor) -> Affine:
        shift = self.time_term() * scalar_time(t, like)
        bias = self.inner.bias
        return Affine(linear_matmul(self.inner), None, shift if bias is None else bias + shift,
                      linear_matmul_fm(self.inner))

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if tt.dim() and tt.shape == x.shape[:-1]:
            tt = tt.unsqueeze(-1)
        return self.inner(x) + self.time_term() * tt

    def to_concat(self) -> ConcatLinear:
        """The equivalent dense ``ConcatLinear`` (time column last)."""
        inner = self.inner.to_linear() if isinstance(self.inner, SparseLinear) else self.inner
        layer = ConcatLinear(self.in_features, self.out_features, bias=inner.bias is not None)
        layer = layer.to(device=self.time_weight.device, dtype=self.time_weight.dtype)
        with torch.no_grad():
            layer.linear.weight.copy_(torch.cat([effective(inner), self.time_term()[:, None]], 1))
            if inner.bias is not None:
                layer.linear.bias.copy_(inner.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, time column folded into bias"


class SparseMLPField(nn.Module):
    """An ``MLPVectorField`` whose layers were sparsified: same attributes (``layers``, ``dim``,
    ``hidden``, ``time``, ``activation``) and call ``field(t, x)``, running the fused path
    (folded time column, bias and activation in the kernel epilogue)."""

    def __init__(self, field: MLPVectorField) -> None:
        super().__init__()
        self.dim, self.hidden, self.time, self.activation = field.dim, field.hidden, field.time, field.activation
        self.layers = field.layers

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")
        from sparseode.nn import fused_field  # imports this module
        fused = fused_field.fused_forward(self, t, x)  # every layer in one op call, where it can run
        if fused is not None:
            return fused
        if torch.as_tensor(t).numel() == 1:
            if not torch.is_grad_enabled() and x.dim() == 2:
                return forward_with_tangents(self, t, x, None)[0]  # feature-major inference path
            return field_forward(self, t, x)
        # per-sample times (torchdiffeq passes one t; other callers may not): the layers' own calls
        act, h, last = ACTIVATIONS[self.activation], x, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h) if self.time is None else layer(t, h)
            h = act(h) if i < last else h
        return h

    def fused_trace(self, trace: str, like: Tensor) -> Callable | None:
        """The CNF dynamics ``fn(field, t, x, noise) -> (dx, -trace)`` through the fused field op
        (forward-mode trace, hand-written backward) for states like ``like``, or None where it
        cannot run (see ``sparseode.nn.fused_field``)."""
        from sparseode.nn import fused_field
        return fused_field.fused_trace(trace) if fused_field.can_run(self, like) else None

    def to_dense(self) -> MLPVectorField:
        """The equivalent ``MLPVectorField`` (layers shared, folded concat layers unfolded)."""
        field = MLPVectorField(self.dim, self.hidden, self.time, self.activation)
        field.layers = nn.ModuleList(
            layer.to_concat() if isinstance(layer, FoldedConcatLinear) else layer for layer in self.layers)
        return field

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, time={self.time!r}, activation={self.activation!r}"
