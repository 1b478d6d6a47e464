"""``FoldedConcatLinear``: a ``ConcatLinear`` with its time column folded into the bias
(``W[:, :d] x + (b + W[:, d] t)``, no concatenation per solver step). It joins the forward-mode
machinery of ``sparseode.models.forward_mode`` through ``affine``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from sparseode.models.forward_mode import Affine, linear_matmul, linear_matmul_fm, scalar_time
from sparseode.models.vector_field import ConcatLinear
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
