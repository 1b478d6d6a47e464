"""Sparse weight formats: a fixed sparsity pattern plus trainable stored values.

A weight ``W`` of shape ``(out_features, in_features)`` is held as

* ``masked``: ``values`` (out, in) dense, ``mask`` (out, in) bool; W = values * mask.
* ``csr``: ``values`` (nnz,), ``crow`` (out + 1,), ``col`` (nnz,) int64, columns sorted in each row.
* ``bsr``: ``values`` (nnz_blocks, bh, bw), ``crow`` (out / bh + 1,), ``col`` (nnz_blocks,) block
  columns; a block is stored when any of its entries is kept, and ``block_mask`` (nnz_blocks, bh, bw)
  marks which entries of a stored block are kept (the others hold zeros and get no gradient).

CSR and BSR also keep the transposed pattern (``crow_t``, ``col_t``) and ``perm`` (stored block
``q`` of W^T is block ``perm[q]`` of W), built once here so the backward pass never converts.

The pattern is fixed: only ``values`` is an ``nn.Parameter``, so training never revives a pruned
weight. The pattern tensors travel to the ops as one list, ``pattern``, in the order of
``PATTERN_FIELDS[format]``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparseode.ops import reference
from sparseode.ops.layout import FORMATS, PATTERN_FIELDS, block_of, check_format

def _compressed(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> tuple[Tensor, ...]:
    """CSR index arrays of a pattern given as (row, col) pairs sorted by row then column.

    Returns crow (n_rows + 1,), crow_t (n_cols + 1,), col_t and perm, all int64.
    """
    crow = torch.zeros(n_rows + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    perm = torch.argsort(cols * max(n_rows, 1) + rows)
    crow_t = torch.zeros(n_cols + 1, dtype=torch.long)
    crow_t[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
    return crow, crow_t, rows[perm].contiguous(), perm


def _check_mask(weight: Tensor, mask: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor, got dtype {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the weight has shape {tuple(weight.shape)}")


def _check_block(block: Any, shape: tuple[int, int]) -> tuple[int, int]:
    try:
        bh, bw = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair of positive ints (bh, bw), got {block!r}") from None
    if bh < 1 or bw < 1:
        raise ValueError(f"block must be a pair of positive ints (bh, bw), got {block!r}")
    if shape[0] % bh or shape[1] % bw:
        raise ValueError(
            f"block {(bh, bw)} does not tile a weight of shape {tuple(shape)}: "
            f"{shape[0]} % {bh} = {shape[0] % bh}, {shape[1]} % {bw} = {shape[1] % bw}"
        )
    return bh, bw


class SparseWeight(nn.Module):
    """A weight of shape ``(out_features, in_features)`` in one of :data:`FORMATS`.

    Build it with :meth:`from_dense`; ``values`` is the only parameter, the rest are buffers.
    """

    def __init__(self, fmt: str, shape: tuple[int, int], values: Tensor, pattern: dict[str, Tensor]):
        super().__init__()
        check_format(fmt)
        self.format = fmt
        self.shape = (int(shape[0]), int(shape[1]))
        self.values = nn.Parameter(values)
        for name in PATTERN_FIELDS[fmt]:
            self.register_buffer(name, pattern[name])

    @classmethod
    def from_dense(
        cls, weight: Tensor, mask: Tensor | None = None, format: str = "csr", block: tuple[int, int] = (16, 16)
    ) -> "SparseWeight":
        """Store ``weight`` (out, in) where ``mask`` (bool, same shape) is True.

        ``mask`` defaults to ``weight != 0``. ``block`` is used by ``bsr`` only and must tile the
        weight exactly. Stored values are copies: the result does not alias ``weight``.
        """
        check_format(format)
        weight = weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
        mask = weight != 0 if mask is None else mask
        _check_mask(weight, mask)
        mask = mask.to(weight.device)
        out_f, in_f = weight.shape
        if format == "masked":
            values = torch.where(mask, weight, torch.zeros_like(weight))
            return cls("masked", (out_f, in_f), values, {"mask": mask.clone()})
        dev = weight.device
        if format == "csr":
            idx = mask.cpu().nonzero()
            rows, cols = idx[:, 0].contiguous(), idx[:, 1].contiguous()
            crow, crow_t, col_t, perm = _compressed(rows, cols, out_f, in_f)
            values = weight[rows.to(dev), cols.to(dev)].clone()
            pattern = {"crow": crow, "col": cols, "crow_t": crow_t, "col_t": col_t, "perm": perm}
        else:
            bh, bw = _check_block(block, (out_f, in_f))
            grid = (out_f // bh, in_f // bw)
            mask_blocks = mask.reshape(grid[0], bh, grid[1], bw).permute(0, 2, 1, 3)
            idx = mask_blocks.any(dim=(2, 3)).cpu().nonzero()
            rows, cols = idx[:, 0].contiguous(), idx[:, 1].contiguous()
            crow, crow_t, col_t, perm = _compressed(rows, cols, grid[0], grid[1])
            r, c = rows.to(dev), cols.to(dev)
            block_mask = mask_blocks[r, c].contiguous()
            w_blocks = weight.reshape(grid[0], bh, grid[1], bw).permute(0, 2, 1, 3)[r, c]
            values = torch.where(block_mask, w_blocks, torch.zeros_like(w_blocks)).contiguous()
            pattern = {"crow": crow, "col": cols, "crow_t": crow_t, "col_t": col_t, "perm": perm,
                       "block_mask": block_mask}
        pattern = {k: v.to(dev) for k, v in pattern.items()}
        return cls(format, (out_f, in_f), values, pattern)

    @property
    def pattern(self) -> list[Tensor]:
        """The pattern tensors in the order of ``PATTERN_FIELDS[self.format]`` (the ops' order)."""
        buffers = self._buffers  # direct dict access: this runs once per layer call
        return [buffers[name] for name in PATTERN_FIELDS[self.format]]

    @property
    def block(self) -> tuple[int, int]:
        return block_of(self.format, self.pattern)

    def kept_mask(self) -> Tensor:
        """Boolean (out, in) tensor of the kept positions."""
        if self.format == "masked":
            return self.get_buffer("mask").clone()
        return reference.dense_weight(torch.ones_like(self.values), self.pattern, self.format) != 0

    def nnz(self) -> int:
        """Number of kept weights (not counting zeros stored inside BSR blocks)."""
        return int(self.kept_mask().sum())

    def stored(self) -> int:
        """Number of stored values (what the kernels read)."""
        return self.values.numel()

    def to_dense(self) -> Tensor:
        """The dense weight (out, in); differentiable with respect to ``values``."""
        return reference.dense_weight(self.values, self.pattern, self.format)

    def extra_repr(self) -> str:
        extra = f", block={self.block}" if self.format == "bsr" else ""
        return f"format={self.format!r}, shape={self.shape}, nnz={self.nnz()}{extra}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A saved pattern may hold a different number of stored entries than this module was built
        # with: adopt the saved shapes, so any SparseWeight loads any saved one of its format.
        for name in ("values",) + PATTERN_FIELDS[self.format]:
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                saved = state_dict[key]
                if current.shape != saved.shape:
                    new = torch.empty_like(saved, dtype=current.dtype, device=current.device)
                    if name == "values":
                        self.values = nn.Parameter(new, requires_grad=current.requires_grad)
                    else:
                        setattr(self, name, new)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
