"""The typed sparsity pattern of each format: named index tensors, fixed once a weight is built.

A weight ``W`` of shape ``(N, K)`` = ``(out_features, in_features)`` is held as ``values`` plus
one of these patterns:

* :class:`MaskedPattern`: ``mask`` (N, K) bool; ``values`` (N, K) dense, W = values * mask.
* :class:`CSRPattern`: ``crow`` (N + 1,), ``col`` (nnz,) int64, columns sorted and unique in each
  row; ``values`` (nnz,).
* :class:`BSRPattern`: the same over (bh, bw) blocks: ``crow`` (N / bh + 1,), ``col`` (nnz_blocks,)
  block columns; ``values`` (nnz_blocks, bh, bw); ``block_mask`` (nnz_blocks, bh, bw) bool marks
  the kept entries of each stored block (the others hold zeros and get no gradient).

CSR and BSR also hold the transposed pattern (``crow_t``, ``col_t``) and ``perm`` (stored entry
``q`` of W^T is entry ``perm[q]`` of W), built once so that the backward pass never converts.
The field order is the order in which the ops of ``sparseode.ops.library`` take the tensors.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MaskedPattern(NamedTuple):
    mask: Tensor  # (N, K) bool


class CSRPattern(NamedTuple):
    crow: Tensor  # (N + 1,) int64, crow[0] = 0, non-decreasing, crow[N] = nnz
    col: Tensor  # (nnz,) int64, sorted and unique within each row
    crow_t: Tensor  # (K + 1,) int64, the same for W^T
    col_t: Tensor  # (nnz,) int64
    perm: Tensor  # (nnz,) int64, entry q of W^T is entry perm[q] of W


class BSRPattern(NamedTuple):
    crow: Tensor  # (N / bh + 1,) int64
    col: Tensor  # (nnz_blocks,) int64 block columns
    crow_t: Tensor  # (K / bw + 1,) int64
    col_t: Tensor  # (nnz_blocks,) int64
    perm: Tensor  # (nnz_blocks,) int64
    block_mask: Tensor  # (nnz_blocks, bh, bw) bool


Pattern = MaskedPattern | CSRPattern | BSRPattern


def compressed(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CSR index arrays of (row, col) pairs sorted by row then column: (crow (n_rows + 1,),
    crow_t (n_cols + 1,), col_t (nnz,), perm (nnz,)), all int64 on the CPU."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    perm = torch.argsort(cols * max(n_rows, 1) + rows)
    crow_t = torch.zeros(n_cols + 1, dtype=torch.long)
    crow_t[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
    return crow, crow_t, rows[perm].contiguous(), perm


def row_of_each(crow: Tensor) -> Tensor:
    """Row (block row) of every stored entry of a compressed pattern, (nnz,) int64."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)
