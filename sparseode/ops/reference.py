"""The pure-PyTorch truth for every primitive and format; every backend is tested against it, and
it is the fallback kernel of every op (sparseode/ops/library.py) where no compiled one exists.

Conventions (all formats): a weight W (N, K) given by ``values`` and a typed ``pattern`` (see
patterns.py); x (B, K), g and a (B, N), c (B, K). Everything here is plain differentiable PyTorch,
so it can be checked with ``gradcheck`` in float64.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from sparseode.activations import ACTIVATIONS, GRADS_FROM_OUTPUT
from sparseode.ops.handlers import FormatHandler, handler_of
from sparseode.ops.patterns import Pattern

# The activations the kernels fuse into their epilogue, and their derivative from the output.
ACTIVATION_FNS = {name: ACTIVATIONS[name] for name in GRADS_FROM_OUTPUT}
ACTIVATION_GRADS_FROM_OUTPUT = GRADS_FROM_OUTPUT


def dense_weight(values: Tensor, pattern: Pattern) -> Tensor:
    """The dense (N, K) weight held by ``values`` and ``pattern``; differentiable in ``values``."""
    return handler_of(pattern).dense_weight(values, pattern)


def gather_stored(dense: Tensor, pattern: Pattern) -> Tensor:
    """Entries of a dense (N, K) tensor at the kept positions, shaped like ``values`` (zeros at
    stored positions that are not kept, e.g. inside BSR blocks)."""
    return handler_of(pattern).gather_stored(dense, pattern)


def spmm(x: Tensor, values: Tensor, pattern: Pattern, bias: Tensor | None = None,
         activation: str = "identity") -> Tensor:
    """act(x W^T + bias): x (B, K) -> (B, N)."""
    return ACTIVATION_FNS[activation](F.linear(x, dense_weight(values, pattern), bias))


def column_epilogue(y: Tensor, bias: Tensor | None, activation: str, act_cols: int) -> Tensor:
    """Feature-major epilogue: act(y + bias) on columns [0, act_cols) of y (N, B), the rest as is."""
    head = y[:, :act_cols]
    if bias is not None:
        head = head + bias[:, None]
    return torch.cat([ACTIVATION_FNS[activation](head), y[:, act_cols:]], dim=1)


def spmm_fm(xT: Tensor, values: Tensor, pattern: Pattern, bias: Tensor | None, activation: str,
            act_cols: int) -> Tensor:
    """Feature-major spmm: xT (K, B) -> W xT (N, B), with bias and activation on the first
    ``act_cols`` columns only (the others are tangent directions of forward-mode products)."""
    return column_epilogue(dense_weight(values, pattern) @ xT, bias, activation, act_cols)


def spmm_t(g: Tensor, values: Tensor, pattern: Pattern) -> Tensor:
    """g W: g (B, N) -> (B, K)."""
    return g @ dense_weight(values, pattern)


def sddmm(a: Tensor, c: Tensor, pattern: Pattern) -> Tensor:
    """(a^T c) at the kept positions: a (B, N), c (B, K) -> shaped like ``values``."""
    return gather_stored(a.transpose(0, 1) @ c, pattern)


def reference_kernels(h: FormatHandler) -> dict[str, Callable]:
    """op name -> the reference taking the op's flat arguments (pattern tensors in field order)."""
    n, typed = len(h.pattern_type._fields), h.pattern_type

    def flat_spmm(x, values, *rest):
        return spmm(x, values, typed(*rest[:n]), *rest[n:])

    def flat_spmm_fm(xT, values, *rest):
        return spmm_fm(xT, values, typed(*rest[:n]), *rest[n:])

    def flat_spmm_t(g, values, *pattern):
        return spmm_t(g, values, typed(*pattern))

    def flat_sddmm(a, c, *pattern):
        return sddmm(a, c, typed(*pattern))

    return {h.op_name("spmm"): flat_spmm, h.op_name("spmm_fm"): flat_spmm_fm, h.op_name("spmm_t"): flat_spmm_t,
            h.op_name("sddmm"): flat_sddmm}
