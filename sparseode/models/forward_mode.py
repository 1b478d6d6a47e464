"""Forward-mode Jacobian-vector products of MLP vector fields, for the CNF's inference dynamics.

Each layer of an ``MLPVectorField`` is seen at time t as an affine map of its input (an
:class:`Affine`): ``layer(t, h) = scale * (h W^T) + shift``. Tangent directions v go through the
same maps without the shift, times the activation's derivative, so ``J v`` rides along with the
forward pass: the exact trace needs one stacked pass with the d unit vectors as tangents instead
of d backward passes, and Hutchinson's estimate one pass with the probe.

Layers other modules define (sparse layers) join by providing ``affine(t, like) -> Affine``;
linear-like layers may provide ``fused_linear(z, bias, activation)`` (a kernel computing
``act(z W^T + bias)``), which the field then uses with bias and activation fused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparseode.activations import ACTIVATIONS, GRADS_FROM_OUTPUT, derivative
from sparseode.pruned import effective

from .vector_field import ConcatLinear, ConcatSquashLinear

Matmul = Callable[[Tensor, "Tensor | None", str], Tensor]
MatmulFM = Callable[[Tensor, "Tensor | None", str, int], Tensor]


def _dense(weight: Tensor) -> Matmul:
    return lambda z, bias, activation: ACTIVATIONS[activation](F.linear(z, weight, bias))


def _dense_fm(weight: Tensor) -> MatmulFM:
    def matmul_fm(zT: Tensor, bias: Tensor | None, activation: str, act_cols: int) -> Tensor:
        y = weight @ zT
        if act_cols and (bias is not None or activation != "identity"):
            head = y[:, :act_cols] + bias[:, None] if bias is not None else y[:, :act_cols]
            y[:, :act_cols] = ACTIVATIONS[activation](head)
        return y

    return matmul_fm


def _linear_kernel(layer: nn.Module, method: str, dense: Callable[[Tensor], Callable]) -> Callable:
    """The layer's own fused kernel ``method`` when it has one, else ``dense`` of its weight."""
    fused = getattr(layer, method, None)
    if fused is not None:
        return fused
    if isinstance(layer, nn.Linear):
        return dense(effective(layer))
    raise TypeError(f"expected a linear layer, got {type(layer).__name__}")


def linear_matmul(layer: nn.Module) -> Matmul:
    """``fn(z, bias, activation) = act(z W^T + bias)`` of a linear-like layer, z (..., in)."""
    return _linear_kernel(layer, "fused_linear", _dense)


def linear_matmul_fm(layer: nn.Module) -> MatmulFM:
    """Feature-major ``fn(zT, bias, activation, act_cols)``: zT (in, B) -> W zT (out, B) with bias
    and activation on the first ``act_cols`` columns only (see :class:`Affine`)."""
    return _linear_kernel(layer, "fused_linear_fm", _dense_fm)


@dataclass
class Affine:
    """``layer(t, h) = scale * matmul(h, None, "identity") + shift`` at a fixed t, where
    ``matmul(z, bias, act)`` computes ``act(z W^T + bias)``; ``scale``, ``shift``: (out,) or None.
    With ``scale`` None, bias ``shift`` and the activation can be fused into one matmul call.
    ``matmul_fm`` is the same product feature-major (z^T in, (W z^T) out), with the bias and
    activation applied to a leading range of columns only (the states; the rest are tangents)."""

    matmul: Matmul
    scale: Tensor | None
    shift: Tensor | None
    matmul_fm: MatmulFM


def scalar_time(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` as a 0-d tensor of ``like``'s dtype and device (one time for the whole batch)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.numel() != 1:
        raise ValueError(f"the affine view needs one time for the whole batch, got t of shape {tuple(t.shape)}")
    return t.reshape(())


def layer_affine(layer: nn.Module, t: Tensor | float, like: Tensor) -> Affine:
    """The :class:`Affine` of one field layer at time ``t`` (``like`` gives dtype and device)."""
    own = getattr(layer, "affine", None)
    if own is not None:
        return own(t, like)
    if isinstance(layer, ConcatLinear):
        weight = effective(layer.linear)
        d = layer.in_features
        shift = weight[:, d] * scalar_time(t, like)
        if layer.linear.bias is not None:
            shift = shift + layer.linear.bias
        return Affine(_dense(weight[:, :d]), None, shift, _dense_fm(weight[:, :d]))
    if isinstance(layer, ConcatSquashLinear):
        t_col = scalar_time(t, like).reshape(1, 1)
        scale = torch.sigmoid(layer.gate(t_col)).reshape(-1)
        shift = layer.hyper_bias(t_col).reshape(-1)
        if layer.linear.bias is not None:
            shift = shift + layer.linear.bias * scale
        return Affine(linear_matmul(layer.linear), scale, shift, linear_matmul_fm(layer.linear))
    return Affine(linear_matmul(layer), None, layer.bias, linear_matmul_fm(layer))


def _fusable(affine: Affine, activation: str) -> bool:
    return affine.scale is None and activation in GRADS_FROM_OUTPUT


def apply_affine(affine: Affine, h: Tensor, activation: str) -> tuple[Tensor, Tensor | None]:
    """(act(layer(t, h)), pre-activation or None when bias and activation were fused)."""
    if _fusable(affine, activation):
        return affine.matmul(h, affine.shift, activation), None
    pre = affine.matmul(h, None, "identity")
    if affine.scale is not None:
        pre = pre * affine.scale
    if affine.shift is not None:
        pre = pre + affine.shift
    return ACTIVATIONS[activation](pre), pre


def field_forward(field: nn.Module, t: Tensor | float, x: Tensor) -> Tensor:
    """``field(t, x)`` through the affine views (bias and activation fused where possible), batch-
    major (the layout the autograd ops take); without grad, :func:`forward_with_tangents` with no
    tangents runs the same feature-major."""
    h, last = x, len(field.layers) - 1
    for i, layer in enumerate(field.layers):
        h, _ = apply_affine(layer_affine(layer, t, x), h, field.activation if i < last else "identity")
    return h


def forward_with_tangents(field: nn.Module, t: Tensor | float, x: Tensor,
                          tangents: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(f(t, x), J v)`` for every tangent v, J = df/dx at (t, x), by forward mode.

    x (B, d); tangents (B, m, d), or (1, m, d) shared by the batch, or None; returns f (B, d) and
    J v (B, m, d) (None without tangents). The states and tangents travel through the layers
    together, feature-major: one (width, B (1 + m)) matrix, transposed only at entry and exit, with
    bias and activation on the state columns and the activation's derivative on the tangents.
    """
    B, d = x.shape
    columns = [x.t()]
    m = 0
    if tangents is not None:
        m = tangents.shape[1]
        columns.append(tangents.expand(B, m, d).permute(2, 1, 0).reshape(d, m * B))  # tangent k: cols B(1+k)..
    H = torch.cat(columns, dim=1) if m else x.t().contiguous()
    last = len(field.layers) - 1
    for i, layer in enumerate(field.layers):
        affine = layer_affine(layer, t, x)
        activation = field.activation if i < last else "identity"
        if _fusable(affine, activation):
            H = affine.matmul_fm(H, affine.shift, activation, B)
            pre = None
        else:
            H = affine.matmul_fm(H, None, "identity", 0)
            if affine.scale is not None:
                H = H * affine.scale[:, None]
            pre = H[:, :B] + affine.shift[:, None] if affine.shift is not None else H[:, :B]
            H = torch.cat([ACTIVATIONS[activation](pre), H[:, B:]], dim=1) if activation != "identity" else \
                torch.cat([pre, H[:, B:]], dim=1)
        if m and activation != "identity":
            grad = derivative(activation, pre, H[:, :B])[:, None, :]
            width = H.shape[0]  # not -1 in the reshapes: an empty batch (B = 0) leaves it undetermined
            if torch.is_grad_enabled():  # keep the graph intact
                H = torch.cat([H[:, :B], (H[:, B:].reshape(width, m, B) * grad).reshape(width, m * B)], dim=1)
            else:  # inference: scale the tangent columns where they are, no copy
                H[:, B:].view(width, m, B).mul_(grad)
    f = H[:, :B].t()
    jv = H[:, B:].reshape(d, m, B).permute(2, 1, 0) if m else None
    return f, jv


def supports_forward_mode(field: nn.Module) -> bool:
    """True when ``field`` is an MLP field (``layers``, ``activation``) whose layers all have an
    affine view and whose activation has a known derivative."""
    layers = getattr(field, "layers", None)
    activation = getattr(field, "activation", None)
    if not isinstance(layers, nn.ModuleList) or activation not in ACTIVATIONS:
        return False
    known = (nn.Linear, ConcatLinear, ConcatSquashLinear)
    return all(isinstance(layer, known) or hasattr(layer, "affine") or hasattr(layer, "fused_linear")
               for layer in layers)


def exact_trace_forward(field: nn.Module, t: Tensor, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(f(t, x), -tr(df/dx))`` with the d unit vectors as tangents (one pass, exact, any d).
    x (B, d) -> (dx (B, d), -trace (B,)). ``noise`` is ignored."""
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    eye = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(0)
    dx, jv = forward_with_tangents(field, t, x2, eye)
    trace = torch.diagonal(jv, dim1=1, dim2=2).sum(-1)
    return dx.reshape(x.shape), -trace.reshape(lead)


def hutchinson_trace_forward(field: nn.Module, t: Tensor, x: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(f(t, x), -eᵀ(df/dx)e)`` with the probe ``e = noise`` as the tangent (x's shape)."""
    if noise is None or noise.shape != x.shape:
        raise ValueError(f"hutchinson_trace_forward needs noise of x's shape {tuple(x.shape)}")
    d = x.shape[-1]
    e = noise.reshape(-1, 1, d)
    dx, jv = forward_with_tangents(field, t, x.reshape(-1, d), e)
    estimate = (jv[:, 0] * e[:, 0]).sum(-1)
    return dx.reshape(x.shape), -estimate.reshape(x.shape[:-1])
