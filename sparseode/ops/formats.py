"""``SparseWeight``: a fixed sparsity pattern (typed per format, see patterns.py) plus trainable
stored values, for any format in the registry :data:`~sparseode.ops.handlers.FORMAT_HANDLERS`.

The pattern is fixed: only ``values`` is an ``nn.Parameter``, so training never revives a pruned
weight. It is validated once, when the weight is built and when a state dict is loaded into it,
so no kernel ever reads a malformed pattern and no call pays for the checks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparseode.args import block_shape
from sparseode.ops import reference
from sparseode.ops.handlers import handler
from sparseode.ops.patterns import Pattern
from sparseode.ops.validate import PatternError


def _check_mask(weight: Tensor, mask: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor, got dtype {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the weight has shape {tuple(weight.shape)}")


def _check_block(block: Any, shape: tuple[int, int]) -> tuple[int, int]:
    """``block`` by the package's one rule (sparseode.args.block_shape: an int or a pair of
    integers >= 1, bools and floats refused), and it must tile ``shape``."""
    bh, bw = block_shape(block)
    if shape[0] % bh or shape[1] % bw:
        raise ValueError(
            f"block {(bh, bw)} does not tile a weight of shape {tuple(shape)}: "
            f"{shape[0]} % {bh} = {shape[0] % bh}, {shape[1]} % {bw} = {shape[1] % bw}"
        )
    return bh, bw


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair of ints (out_features, in_features), got {shape!r}") from None
    if out_f < 0 or in_f < 0:
        raise ValueError(f"shape must be non-negative, got {shape!r}")
    return out_f, in_f


class SparseWeight(nn.Module):
    """A weight of shape ``(out_features, in_features)`` in one of the formats of :data:`~sparseode.ops.handlers.FORMAT_HANDLERS`.

    Build it with :meth:`from_dense`, or from ``values`` and a ``pattern`` (the format's pattern
    type, a dict by field name, or a sequence in field order), which is validated here.
    ``values`` is the only parameter, the pattern tensors are buffers.
    """

    def __init__(self, fmt: str, shape: tuple[int, int], values: Tensor, pattern: Pattern | dict[str, Tensor]):
        super().__init__()
        self._handler = handler(fmt)
        self.format = fmt
        self.shape = _check_shape(shape)
        typed = self._handler.validate(pattern, self.shape, values)
        self.values = nn.Parameter(values)
        for name, t in typed._asdict().items():
            self.register_buffer(name, t)

    @classmethod
    def from_dense(
        cls, weight: Tensor, mask: Tensor | None = None, format: str = "csr", block: tuple[int, int] = (16, 16)
    ) -> "SparseWeight":
        """Store ``weight`` (out, in) where ``mask`` (bool, same shape) is True.

        ``mask`` defaults to ``weight != 0``. ``block`` is used by ``bsr`` only and must tile the
        weight exactly. Stored values are copies: the result does not alias ``weight``.
        """
        h = handler(format)
        weight = weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
        mask = weight != 0 if mask is None else mask
        _check_mask(weight, mask)
        block = _check_block(block, tuple(weight.shape)) if format == "bsr" else (1, 1)
        values, pattern = h.from_dense(weight, mask.to(weight.device), block)
        return cls(format, tuple(weight.shape), values, pattern)

    @property
    def pattern(self) -> Pattern:
        """The typed pattern (the format's NamedTuple of buffers)."""
        buffers = self._buffers  # direct dict access: this runs once per layer call
        pattern_type = self._handler.pattern_type
        return pattern_type._make(map(buffers.__getitem__, pattern_type._fields))

    @property
    def block(self) -> tuple[int, int]:
        return self._handler.block(self.pattern)

    def kept_mask(self) -> Tensor:
        """Boolean (out, in) tensor of the kept positions."""
        return reference.dense_weight(torch.ones_like(self.values.detach()), self.pattern) != 0

    def nnz(self) -> int:
        """Number of kept weights (not counting zeros stored inside BSR blocks)."""
        return int(self.kept_mask().sum())

    def stored(self) -> int:
        """Number of stored values (what the kernels read)."""
        return self.values.numel()

    def to_dense(self) -> Tensor:
        """The dense weight (out, in); differentiable with respect to ``values``."""
        return reference.dense_weight(self.values, self.pattern)

    def extra_repr(self) -> str:
        extra = f", block={self.block}" if self.block != (1, 1) else ""
        return f"format={self.format!r}, shape={self.shape}, nnz={self.nnz()}{extra}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A saved pattern may hold a different number of stored entries than this module was built
        # with: adopt the saved shapes, so any SparseWeight loads any saved one of its format. The
        # saved pattern is validated first; a malformed one is reported and nothing is loaded.
        fields = self._handler.pattern_type._fields
        names = ("values",) + fields
        current = {name: getattr(self, name) for name in names}
        saved = {name: state_dict.get(prefix + name, current[name]) for name in names}
        try:
            on_device = {n: saved[n].to(current[n].device) if isinstance(saved[n], Tensor) else saved[n]
                         for n in fields}
            values = saved["values"]
            if isinstance(values, Tensor):
                values = values.to(current["values"].device, current["values"].dtype)
            self._handler.validate(on_device, self.shape, values)
        except PatternError as err:
            error_msgs.append(f"{prefix or 'SparseWeight '}: the saved {self.format} pattern is malformed: {err}")
            return
        for name in names:
            if saved[name].shape != current[name].shape:
                new = torch.empty_like(saved[name], dtype=current[name].dtype, device=current[name].device)
                if name == "values":
                    self.values = nn.Parameter(new, requires_grad=current[name].requires_grad)
                else:
                    setattr(self, name, new)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

