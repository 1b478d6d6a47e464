"""Checks of numeric arguments (pruning API, data metrics), with messages that name the argument.

A number must be a real number (``int``, ``float``, numpy scalars: anything ``numbers.Real``),
not a ``bool``, a string or a tensor, and finite; an integer argument must be an integer
(``numbers.Integral``: ``4.0`` and ``"4"`` are refused, not truncated).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["real", "integer", "fraction", "check_sparsity", "block_shape"]


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, checked finite and within ``[low, high]`` (ends open as asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_kind(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def integer(value: Any, name: str, *, low: int | None = None) -> int:
    """``value`` as an int, checked integral (bool refused) and ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_kind(value)}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return v


def fraction(value: Any, name: str) -> float:
    """A share in ``[0, 1]``."""
    return real(value, name, low=0.0, high=1.0)


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    """A sparsity in ``[0, 1)`` (1 would remove every weight)."""
    return real(value, name, low=0.0, high=1.0, high_open=True)


def block_shape(block: Any, name: str = "block") -> tuple[int, int]:
    """``(rows, cols)`` of a block from an int or a pair of ints, each >= 1."""
    if isinstance(block, numbers.Integral) and not isinstance(block, bool):
        block = (block, block)
    if not isinstance(block, Sequence) or isinstance(block, str) or len(block) != 2:
        raise TypeError(f"{name} must be an int or a pair (rows, cols) of ints, got {_kind(block)}")
    rows = integer(block[0], f"{name}[0]", low=1)
    cols = integer(block[1], f"{name}[1]", low=1)
    return rows, cols
