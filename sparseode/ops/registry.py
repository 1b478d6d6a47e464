"""The three primitives as ``torch.library`` ops in the ``sparseode`` namespace.

Each op's fake (meta) implementation and autograd formula sit beside it. Every backward is written
with the primitives themselves, so second derivatives (CNF training through a vector-Jacobian
product) work on every backend:

* ``spmm``   y = act(x W^T + b):  dx = spmm_t(dy', W), dW = sddmm(dy', x), db = sum(dy'),
  with dy' = dy * act'(y)
* ``spmm_t`` z = g W:             dg = spmm(dz, W),     dW = sddmm(g, dz)
* ``sddmm``  v = P o (a^T c):     da = spmm(c, V),      dc = spmm_t(a, V), V the weight of values dv

The public functions check their arguments (naming the argument in the error), resolve
``backend="auto"`` and call the op while torch.compile traces, the same formulas as plain autograd
Functions in eager mode when a gradient is needed, and the backend kernel directly otherwise.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from sparseode.ops import dispatch
from sparseode.ops.layout import PATTERN_FIELDS, check_format, in_features, out_features, values_shape
from sparseode.ops.reference import ACTIVATION_FNS, ACTIVATION_GRADS_FROM_OUTPUT, column_epilogue

ACTIVATIONS: tuple[str, ...] = tuple(ACTIVATION_FNS)


class _Prims(NamedTuple):
    """How a backward formula calls the primitives: through the registered ops (``OPS``: what
    torch.compile and opcheck see) or through plain autograd Functions (``EAGER``: the same
    formulas without the op machinery's ~0.1 ms per call, for eager training)."""

    spmm: Callable
    spmm_t: Callable
    sddmm: Callable


def _with_prims(setup: Callable, which: str) -> Callable:
    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.prims = OPS if which == "ops" else EAGER

    return setup_context


# --- spmm -------------------------------------------------------------------------------------
@torch.library.custom_op("sparseode::spmm", mutates_args=())
def _spmm_op(x: Tensor, values: Tensor, pattern: list[Tensor], bias: Optional[Tensor], fmt: str,
             activation: str, backend: str) -> Tensor:
    return dispatch.get(backend).spmm(x, values, pattern, bias, fmt, activation)


@_spmm_op.register_fake
def _spmm_fake(x, values, pattern, bias, fmt, activation, backend):
    return x.new_empty((x.shape[0], out_features(fmt, pattern)))


def _spmm_setup(ctx, inputs, output):
    x, values, pattern, bias, fmt, activation, backend = inputs
    keep_output = ACTIVATION_GRADS_FROM_OUTPUT[activation] is not None
    ctx.save_for_backward(x, values, output if keep_output else None, *pattern)
    ctx.fmt, ctx.activation, ctx.backend = fmt, activation, backend


def _spmm_backward(ctx, grad):
    x, values, y, *pattern = ctx.saved_tensors
    act_grad = ACTIVATION_GRADS_FROM_OUTPUT[ctx.activation]
    if act_grad is not None:
        grad = grad * act_grad(y)
    need_x, need_values, _, need_bias = ctx.needs_input_grad[:4]
    gx = ctx.prims.spmm_t(grad, values, pattern, ctx.fmt, ctx.backend) if need_x else None
    gv = ctx.prims.sddmm(grad, x, pattern, ctx.fmt, ctx.backend) if need_values else None
    gb = grad.sum(0) if need_bias else None
    return gx, gv, [None] * len(pattern), gb, None, None, None


_spmm_op.register_autograd(_spmm_backward, setup_context=_with_prims(_spmm_setup, "ops"))


# --- spmm_t -----------------------------------------------------------------------------------
@torch.library.custom_op("sparseode::spmm_t", mutates_args=())
def _spmm_t_op(g: Tensor, values: Tensor, pattern: list[Tensor], fmt: str, backend: str) -> Tensor:
    return dispatch.get(backend).spmm_t(g, values, pattern, fmt)


@_spmm_t_op.register_fake
def _spmm_t_fake(g, values, pattern, fmt, backend):
    return g.new_empty((g.shape[0], in_features(fmt, pattern)))


def _two_operand_setup(ctx, inputs, output):
    """Setup of spmm_t (g, values) and sddmm (a, c): both take two operands, the pattern, fmt, backend."""
    first, second, pattern, fmt, backend = inputs
    ctx.save_for_backward(first, second, *pattern)
    ctx.fmt, ctx.backend = fmt, backend


def _spmm_t_backward(ctx, grad):
    g, values, *pattern = ctx.saved_tensors
    need_g, need_values = ctx.needs_input_grad[:2]
    gg = ctx.prims.spmm(grad, values, pattern, None, ctx.fmt, "identity", ctx.backend) if need_g else None
    gv = ctx.prims.sddmm(g, grad, pattern, ctx.fmt, ctx.backend) if need_values else None
    return gg, gv, [None] * len(pattern), None, None


_spmm_t_op.register_autograd(_spmm_t_backward, setup_context=_with_prims(_two_operand_setup, "ops"))


# --- sddmm ------------------------------------------------------------------------------------
@torch.library.custom_op("sparseode::sddmm", mutates_args=())
def _sddmm_op(a: Tensor, c: Tensor, pattern: list[Tensor], fmt: str, backend: str) -> Tensor:
    return dispatch.get(backend).sddmm(a, c, pattern, fmt)


@_sddmm_op.register_fake
def _sddmm_fake(a, c, pattern, fmt, backend):
    return a.new_empty(values_shape(fmt, pattern))


def _sddmm_backward(ctx, grad):
    a, c, *pattern = ctx.saved_tensors
    need_a, need_c = ctx.needs_input_grad[:2]
    ga = ctx.prims.spmm(c, grad, pattern, None, ctx.fmt, "identity", ctx.backend) if need_a else None
    gc = ctx.prims.spmm_t(a, grad, pattern, ctx.fmt, ctx.backend) if need_c else None
    return ga, gc, [None] * len(pattern), None, None


_sddmm_op.register_autograd(_sddmm_backward, setup_context=_with_prims(_two_operand_setup, "ops"))


# --- eager autograd Functions with the same formulas ---------------------------------------------
def _eager_function(name: str, setup: Callable, backward: Callable) -> type:
    """An autograd.Function running backend method ``name`` (the backend is the last argument)."""

    def forward(*args):
        return getattr(dispatch.get(args[-1]), name)(*args[:-1])

    def function_backward(ctx, grad):
        # the op formulas return a list of Nones for the pattern list; a Function returns one None
        return tuple(None if isinstance(g, list) else g for g in backward(ctx, grad))

    return type(f"_{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(_with_prims(setup, "eager")),
        "backward": staticmethod(function_backward),
    })


OPS = _Prims(_spmm_op, _spmm_t_op, _sddmm_op)
EAGER = _Prims(_eager_function("spmm", _spmm_setup, _spmm_backward).apply,
               _eager_function("spmm_t", _two_operand_setup, _spmm_t_backward).apply,
               _eager_function("sddmm", _two_operand_setup, _sddmm_backward).apply)


# --- public, checked entry points ---------------------------------------------------------------
def _check_pattern(values: Tensor, pattern: list[Tensor], fmt: str) -> None:
    check_format(fmt)
    if len(pattern) != len(PATTERN_FIELDS[fmt]):
        raise ValueError(
            f"pattern for format {fmt!r} must hold {len(PATTERN_FIELDS[fmt])} tensors "
            f"({', '.join(PATTERN_FIELDS[fmt])}), got {len(pattern)}"
        )
    if tuple(values.shape) != values_shape(fmt, pattern):
        raise ValueError(f"values has shape {tuple(values.shape)}, the pattern needs {values_shape(fmt, pattern)}")


def _check_operand(name: str, t: Tensor, values: Tensor, width: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, {what}), got shape {tuple(t.shape)}")
    if t.shape[1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: expected {width} {what} in its last dimension")
    if t.dtype != values.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the weight has dtype {values.dtype}")
    if t.device != values.device:
        raise ValueError(f"{name} is on {t.device} but the weight is on {values.device}")


def _prims_for(*tensors: Tensor | None) -> _Prims | None:
    """The registered ops while torch.compile traces, the eager Functions when autograd will record
    the call, None when neither: then the backend kernel is called directly (no autograd
    bookkeeping at all on the solver's inference path)."""
    if torch.compiler.is_compiling():
        return OPS
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return EAGER
    return None


def _backend_for(backend: str, t: Tensor, fmt: str) -> str:
    name = dispatch.resolve(backend, t.device, fmt)
    dispatch.get(name).check(t)
    return name


def spmm(x: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None = None, fmt: str = "csr",
         activation: str = "identity", backend: str = "auto") -> Tensor:
    """y = act(x W^T + bias) for x (B, K), W (N, K) in format ``fmt``; returns (B, N)."""
    _check_pattern(values, pattern, fmt)
    _check_operand("x", x, values, in_features(fmt, pattern), "input features")
    if activation not in ACTIVATION_FNS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if bias is not None:
        n = out_features(fmt, pattern)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != values.dtype or bias.device != values.device:
            raise TypeError(f"bias must match the weight's dtype and device ({values.dtype}, {values.device})")
    name = _backend_for(backend, x, fmt)
    prims = _prims_for(x, values, bias)
    if prims is None:
        return dispatch.get(name).spmm(x, values, pattern, bias, fmt, activation)
    return prims.spmm(x, values, pattern, bias, fmt, activation, name)


def spmm_t(g: Tensor, values: Tensor, pattern: list[Tensor], fmt: str = "csr", backend: str = "auto") -> Tensor:
    """g W for g (B, N), W (N, K) in format ``fmt``; returns (B, K)."""
    _check_pattern(values, pattern, fmt)
    _check_operand("g", g, values, out_features(fmt, pattern), "output features")
    name = _backend_for(backend, g, fmt)
    prims = _prims_for(g, values)
    if prims is None:
        return dispatch.get(name).spmm_t(g, values, pattern, fmt)
    return prims.spmm_t(g, values, pattern, fmt, name)


def sddmm(a: Tensor, c: Tensor, pattern: list[Tensor], fmt: str = "csr", backend: str = "auto") -> Tensor:
    """(a^T c) at the stored positions of the pattern: a (B, N), c (B, K); shaped like ``values``."""
    check_format(fmt)
    like = a.new_empty(values_shape(fmt, pattern)) if isinstance(a, Tensor) else None
    _check_operand("a", a, like, out_features(fmt, pattern), "output features")
    _check_operand("c", c, like, in_features(fmt, pattern), "input features")
    if a.shape[0] != c.shape[0]:
        raise ValueError(f"a and c must share the batch size, got {a.shape[0]} and {c.shape[0]}")
    name = _backend_for(backend, a, fmt)
    prims = _prims_for(a, c)
    if prims is None:
        return dispatch.get(name).sddmm(a, c, pattern, fmt)
    return prims.sddmm(a, c, pattern, fmt, name)


def spmm_fm(xT: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str, activation: str,
            act_cols: int, backend: str = "auto") -> Tensor:
    """Feature-major spmm: xT (K, B) -> (N, B) = W xT, with bias and activation on the first
    ``act_cols`` columns only. With autograd recording, it runs through the differentiable ops."""
    _check_pattern(values, pattern, fmt)
    if xT.dim() != 2 or xT.shape[0] != in_features(fmt, pattern):
        raise ValueError(f"xT has shape {tuple(xT.shape)}: expected ({in_features(fmt, pattern)}, batch)")
    if not 0 <= act_cols <= xT.shape[1]:
        raise ValueError(f"act_cols must lie in [0, {xT.shape[1]}], got {act_cols}")
    if _prims_for(xT, values, bias) is not None:
        y = spmm(xT.t(), values, pattern, None, fmt, "identity", backend).t()
        return column_epilogue(y, bias, activation, act_cols)
    name = _backend_for(backend, xT, fmt)
    return dispatch.get(name).spmm_fm(xT, values, pattern, bias, fmt, activation, act_cols)
