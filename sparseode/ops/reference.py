"""The pure-PyTorch truth for every primitive and format; every backend is tested against it.

Conventions (all formats): a weight W (N, K) given by ``values`` and ``pattern`` (see formats.py);
x (B, K), g and a (B, N), c (B, K). Everything here is plain differentiable PyTorch, so it can be
checked with ``gradcheck`` in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from sparseode.activations import ACTIVATIONS, GRADS_FROM_OUTPUT

from sparseode.ops.layout import block_of, in_features, out_features


# The activations the kernels fuse into their epilogue, and their derivative from the output.
ACTIVATION_FNS = {name: ACTIVATIONS[name] for name in GRADS_FROM_OUTPUT}
ACTIVATION_GRADS_FROM_OUTPUT = GRADS_FROM_OUTPUT


def _coordinates(pattern: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Block row and block column of every stored block (entry for CSR)."""
    crow, col = pattern[0], pattern[1]
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)
    return rows, col


def dense_weight(values: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
    """The dense (N, K) weight held by ``values`` and ``pattern``; differentiable in ``values``."""
    if fmt == "masked":
        return values * pattern[0]
    n, k = out_features(fmt, pattern), in_features(fmt, pattern)
    rows, cols = _coordinates(pattern)
    if fmt == "csr":
        return values.new_zeros((n, k)).index_put((rows, cols), values)
    bh, bw = block_of(fmt, pattern)
    grid = values.new_zeros((n // bh, k // bw, bh, bw)).index_put((rows, cols), values * pattern[5])
    return grid.permute(0, 2, 1, 3).reshape(n, k)


def gather_stored(dense: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
    """Entries of a dense (N, K) tensor at the stored positions, shaped like ``values``.

    Entries of a BSR block that are not kept (block_mask False) are zero.
    """
    if fmt == "masked":
        return torch.where(pattern[0], dense, torch.zeros_like(dense))
    rows, cols = _coordinates(pattern)
    if fmt == "csr":
        return dense[rows, cols]
    bh, bw = block_of(fmt, pattern)
    n, k = dense.shape
    blocks = dense.reshape(n // bh, bh, k // bw, bw).permute(0, 2, 1, 3)[rows, cols]
    return torch.where(pattern[5], blocks, torch.zeros_like(blocks))


def spmm(x: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str,
         activation: str = "identity") -> Tensor:
    """act(x W^T + bias): x (B, K) -> (B, N)."""
    return ACTIVATION_FNS[activation](F.linear(x, dense_weight(values, pattern, fmt), bias))


def column_epilogue(y: Tensor, bias: Tensor | None, activation: str, act_cols: int) -> Tensor:
    """Feature-major epilogue: act(y + bias) on columns [0, act_cols) of y (N, B), the rest as is."""
    head = y[:, :act_cols]
    if bias is not None:
        head = head + bias[:, None]
    return torch.cat([ACTIVATION_FNS[activation](head), y[:, act_cols:]], dim=1)


def spmm_fm(xT: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str, activation: str,
            act_cols: int) -> Tensor:
    """Feature-major spmm: xT (K, B) -> W xT (N, B), with bias and activation on the first
    ``act_cols`` columns only (the others are tangent directions of forward-mode products)."""
    return column_epilogue(dense_weight(values, pattern, fmt) @ xT, bias, activation, act_cols)


def spmm_t(g: Tensor, values: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
    """g W: g (B, N) -> (B, K)."""
    return g @ dense_weight(values, pattern, fmt)


def sddmm(a: Tensor, c: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
    """(a^T c) at the stored positions: a (B, N), c (B, K) -> shaped like ``values``."""
    return gather_stored(a.transpose(0, 1) @ c, pattern, fmt)
