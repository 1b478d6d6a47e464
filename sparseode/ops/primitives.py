"""The primitives as checked public functions: each validates its arguments (naming the argument
in the error) and calls the op of the pattern's format, ``sparseode::<format>_<primitive>``.
Which kernel runs is the op's business (the backend selected for the device, sparseode.ops.select).

Shapes: a weight W (N, K) given by ``values`` and a typed ``pattern``; x (B, K), g and a (B, N),
c (B, K), xT (K, B).
"""
from __future__ import annotations

from torch import Tensor

from sparseode.ops.handlers import handler_of
from sparseode.ops.library import ACTIVATIONS, op
from sparseode.ops.patterns import Pattern
from sparseode.ops.validate import PatternError


def _check_pattern(values: Tensor, pattern: Pattern) -> tuple[int, int]:
    h = handler_of(pattern)
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if tuple(values.shape) != h.values_shape(pattern):
        raise PatternError(f"values has shape {tuple(values.shape)}, the pattern needs {h.values_shape(pattern)}")
    return h.shape(pattern)


def _check_operand(name: str, t: Tensor, like: Tensor, width: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, {what}), got shape {tuple(t.shape)}")
    if t.shape[1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: expected {width} {what} in its last dimension")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the weight has dtype {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the weight is on {like.device}")


def _check_epilogue(values: Tensor, n: int, bias: Tensor | None, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != values.dtype or bias.device != values.device:
            raise TypeError(f"bias must match the weight's dtype and device ({values.dtype}, {values.device})")


def spmm(x: Tensor, values: Tensor, pattern: Pattern, bias: Tensor | None = None,
         activation: str = "identity") -> Tensor:
    """y = act(x W^T + bias) for x (B, K); returns (B, N)."""
    n, k = _check_pattern(values, pattern)
    _check_operand("x", x, values, k, "input features")
    _check_epilogue(values, n, bias, activation)
    return op(handler_of(pattern).name, "spmm")(x, values, *pattern, bias, activation)


def spmm_fm(xT: Tensor, values: Tensor, pattern: Pattern, bias: Tensor | None = None,
            activation: str = "identity", act_cols: int = 0) -> Tensor:
    """Feature-major spmm: xT (K, B) -> (N, B) = W xT, with bias and activation on the first
    ``act_cols`` columns only."""
    n, k = _check_pattern(values, pattern)
    _check_operand("xT^T", xT.t() if isinstance(xT, Tensor) else xT, values, k, "input features")
    _check_epilogue(values, n, bias, activation)
    if not 0 <= act_cols <= xT.shape[1]:
        raise ValueError(f"act_cols must lie in [0, {xT.shape[1]}], got {act_cols}")
    return op(handler_of(pattern).name, "spmm_fm")(xT, values, *pattern, bias, activation, act_cols)


def spmm_t(g: Tensor, values: Tensor, pattern: Pattern) -> Tensor:
    """g W for g (B, N); returns (B, K)."""
    n, _ = _check_pattern(values, pattern)
    _check_operand("g", g, values, n, "output features")
    return op(handler_of(pattern).name, "spmm_t")(g, values, *pattern)


def sddmm(a: Tensor, c: Tensor, pattern: Pattern) -> Tensor:
    """(a^T c) at the kept positions of the pattern: a (B, N), c (B, K); shaped like ``values``."""
    n, k = handler_of(pattern).shape(pattern)
    _check_operand("a", a, a, n, "output features")
    _check_operand("c", c, a, k, "input features")
    if a.shape[0] != c.shape[0]:
        raise ValueError(f"a and c must share the batch size, got {a.shape[0]} and {c.shape[0]}")
    return op(handler_of(pattern).name, "sddmm")(a, c, *pattern)
