"""One handler per sparse format, in the registry :data:`FORMAT_HANDLERS` (name -> handler): how a format is
built from a dense weight, what dense weight it holds (the reference), the shapes that follow
from its pattern, its validation, and the names of its ops. Adding a format is one entry here
plus its ops' kernels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparseode.ops import validate as v
from sparseode.ops.patterns import BSRPattern, CSRPattern, MaskedPattern, Pattern, compressed, row_of_each

PRIMITIVES: tuple[str, ...] = ("spmm", "spmm_fm", "spmm_t", "sddmm")


class FormatHandler:
    """What the rest of the package needs to know about one format (see patterns.py for the
    layouts). Subclasses set ``name`` and ``pattern_type`` and implement the methods below."""

    name: str = ""
    pattern_type: type = tuple

    def op_name(self, primitive: str) -> str:
        """The ``torch.ops.sparseode`` op of ``primitive`` for this format, e.g. ``csr_spmm``."""
        return f"{self.name}_{primitive}"

    def from_dense(self, weight: Tensor, mask: Tensor, block: tuple[int, int]) -> tuple[Tensor, Pattern]:
        """(values, pattern) storing ``weight`` (N, K) where the bool ``mask`` (N, K) is True."""
        raise NotImplementedError

    def dense_weight(self, values: Tensor, pattern: Pattern) -> Tensor:
        """The dense (N, K) weight; plain differentiable PyTorch (the reference)."""
        raise NotImplementedError

    def gather_stored(self, dense: Tensor, pattern: Pattern) -> Tensor:
        """Entries of a dense (N, K) tensor at the kept positions, shaped like ``values`` (zeros at
        stored positions that are not kept)."""
        raise NotImplementedError

    def shape(self, pattern: Pattern) -> tuple[int, int]:
        """(out_features, in_features) of the weight."""
        raise NotImplementedError

    def values_shape(self, pattern: Pattern) -> tuple[int, ...]:
        raise NotImplementedError

    def block(self, pattern: Pattern) -> tuple[int, int]:
        return 1, 1

    def validate(self, pattern: Any, shape: tuple[int, int], values: Tensor) -> Pattern:
        """``pattern`` as this format's pattern type, checked against the weight ``shape`` and
        ``values``; a :class:`~sparseode.ops.validate.PatternError` naming field and position."""
        raise NotImplementedError

    def typed(self, fields: Any) -> Pattern:
        """``fields`` (a mapping by field name or a sequence in field order) as the pattern type."""
        names = self.pattern_type._fields
        if isinstance(fields, dict):
            missing = [n for n in names if n not in fields]
            if missing:
                raise v.PatternError(f"{self.name} pattern lacks {', '.join(missing)}")
            return self.pattern_type(*(fields[n] for n in names))
        fields = tuple(fields)
        if len(fields) != len(names):
            raise v.PatternError(f"a {self.name} pattern has {len(names)} tensors ({', '.join(names)}), "
                                 f"got {len(fields)}")
        return self.pattern_type(*fields)


class MaskedHandler(FormatHandler):
    name = "masked"
    pattern_type = MaskedPattern

    def from_dense(self, weight, mask, block):
        return torch.where(mask, weight, torch.zeros_like(weight)), MaskedPattern(mask.clone())

    def dense_weight(self, values, pattern):
        return values * pattern.mask

    def gather_stored(self, dense, pattern):
        return torch.where(pattern.mask, dense, torch.zeros_like(dense))

    def shape(self, pattern):
        return int(pattern.mask.shape[0]), int(pattern.mask.shape[1])

    def values_shape(self, pattern):
        return tuple(pattern.mask.shape)

    def validate(self, pattern, shape, values):
        p = self.typed(pattern)
        v.check_tensor("mask", p.mask, torch.bool, shape)
        v.check_values(values, shape, p.mask.device)
        return p


class CSRHandler(FormatHandler):
    name = "csr"
    pattern_type = CSRPattern

    def from_dense(self, weight, mask, block):
        idx = mask.cpu().nonzero()
        rows, cols = idx[:, 0].contiguous(), idx[:, 1].contiguous()
        crow, crow_t, col_t, perm = compressed(rows, cols, *weight.shape)
        dev = weight.device
        values = weight[rows.to(dev), cols.to(dev)].clone()
        return values, CSRPattern(*(t.to(dev) for t in (crow, cols, crow_t, col_t, perm)))

    def dense_weight(self, values, pattern):
        n, k = self.shape(pattern)
        return values.new_zeros((n, k)).index_put((row_of_each(pattern.crow), pattern.col), values)

    def gather_stored(self, dense, pattern):
        return dense[row_of_each(pattern.crow), pattern.col]

    def shape(self, pattern):
        return int(pattern.crow.shape[0]) - 1, int(pattern.crow_t.shape[0]) - 1

    def values_shape(self, pattern):
        return (int(pattern.col.shape[0]),)

    def validate(self, pattern, shape, values):
        p = self.typed(pattern)
        device = v.check_same_device(p._asdict())
        v.check_transposed(p.crow, p.col, p.crow_t, p.col_t, p.perm, shape[0], shape[1])
        v.check_values(values, (p.col.numel(),), device)
        return p


class BSRHandler(FormatHandler):
    name = "bsr"
    pattern_type = BSRPattern

    def from_dense(self, weight, mask, block):
        (n, k), (bh, bw) = weight.shape, block
        grid = (n // bh, k // bw)
        mask_blocks = mask.reshape(grid[0], bh, grid[1], bw).permute(0, 2, 1, 3)
        idx = mask_blocks.any(dim=(2, 3)).cpu().nonzero()
        rows, cols = idx[:, 0].contiguous(), idx[:, 1].contiguous()
        crow, crow_t, col_t, perm = compressed(rows, cols, *grid)
        dev = weight.device
        r, c = rows.to(dev), cols.to(dev)
        block_mask = mask_blocks[r, c].contiguous()
        w_blocks = weight.reshape(grid[0], bh, grid[1], bw).permute(0, 2, 1, 3)[r, c]
        values = torch.where(block_mask, w_blocks, torch.zeros_like(w_blocks)).contiguous()
        return values, BSRPattern(*(t.to(dev) for t in (crow, cols, crow_t, col_t, perm)), block_mask)

    def dense_weight(self, values, pattern):
        (n, k), (bh, bw) = self.shape(pattern), self.block(pattern)
        grid = values.new_zeros((n // bh, k // bw, bh, bw))
        grid = grid.index_put((row_of_each(pattern.crow), pattern.col), values * pattern.block_mask)
        return grid.permute(0, 2, 1, 3).reshape(n, k)

    def gather_stored(self, dense, pattern):
        (n, k), (bh, bw) = dense.shape, self.block(pattern)
        blocks = dense.reshape(n // bh, bh, k // bw, bw).permute(0, 2, 1, 3)[row_of_each(pattern.crow), pattern.col]
        return torch.where(pattern.block_mask, blocks, torch.zeros_like(blocks))

    def block(self, pattern):
        return int(pattern.block_mask.shape[1]), int(pattern.block_mask.shape[2])

    def shape(self, pattern):
        bh, bw = self.block(pattern)
        return (int(pattern.crow.shape[0]) - 1) * bh, (int(pattern.crow_t.shape[0]) - 1) * bw

    def values_shape(self, pattern):
        return tuple(pattern.block_mask.shape)

    def validate(self, pattern, shape, values):
        p = self.typed(pattern)
        device = v.check_same_device(p._asdict())
        v.check_tensor("block_mask", p.block_mask, torch.bool, dim=3)
        nnz, bh, bw = p.block_mask.shape
        if bh < 1 or bw < 1 or shape[0] % bh or shape[1] % bw:
            raise v.PatternError(f"block_mask has blocks {bh}x{bw}, which do not tile a weight of shape {shape}")
        v.check_transposed(p.crow, p.col, p.crow_t, p.col_t, p.perm, shape[0] // bh, shape[1] // bw)
        if p.col.numel() != nnz:
            raise v.PatternError(f"block_mask holds {nnz} blocks but col holds {p.col.numel()}")
        v.check_values(values, (nnz, bh, bw), device)
        return p


FORMAT_HANDLERS: dict[str, FormatHandler] = {h.name: h for h in (MaskedHandler(), CSRHandler(), BSRHandler())}
FORMATS: tuple[str, ...] = tuple(FORMAT_HANDLERS)
_BY_TYPE: dict[type, FormatHandler] = {h.pattern_type: h for h in FORMAT_HANDLERS.values()}


def handler(fmt: str) -> FormatHandler:
    """The handler of format ``fmt``; a clear error naming the formats for an unknown one."""
    try:
        return FORMAT_HANDLERS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}") from None


def handler_of(pattern: Pattern) -> FormatHandler:
    """The handler of a typed pattern."""
    try:
        return _BY_TYPE[type(pattern)]
    except KeyError:
        raise TypeError(f"pattern must be one of {', '.join(t.__name__ for t in _BY_TYPE)}, "
                        f"got {type(pattern).__name__}") from None
