"""``SparseMLPField``: an ``MLPVectorField`` on sparse layers, run as one fused op per evaluation
where every layer allows it (``sparseode.nn.fused_field``), else layer by layer with bias and
activation in the kernels' epilogue (the forward-mode machinery of ``sparseode.models.forward_mode``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from sparseode.activations import ACTIVATIONS
from sparseode.models.forward_mode import field_forward, forward_with_tangents
from sparseode.models.vector_field import MLPVectorField
from sparseode.nn import fused_field
from sparseode.nn.folded import FoldedConcatLinear


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
        return fused_field.fused_trace(trace) if fused_field.can_run(self, like) else None

    def to_dense(self) -> MLPVectorField:
        """The equivalent ``MLPVectorField`` (layers shared, folded concat layers unfolded)."""
        field = MLPVectorField(self.dim, self.hidden, self.time, self.activation)
        field.layers = nn.ModuleList(
            layer.to_concat() if isinstance(layer, FoldedConcatLinear) else layer for layer in self.layers)
        return field

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, time={self.time!r}, activation={self.activation!r}"
