"""Element-wise helpers shared by every Triton kernel: the fused bias + activation epilogue and the
non-finite test. Only core ``triton.language`` is used (no libdevice), so the same code runs compiled
on a GPU and in the interpreter (``TRITON_INTERPRET=1``).

Activations are compile-time codes in the order of ``ACTIVATIONS`` (the order of
``sparseode.ops.library.ACTIVATIONS`` and of the ``Activation`` enum in csrc/common.h).
"""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS: tuple[str, ...] = ("identity", "tanh", "relu", "softplus", "sigmoid", "elu")


def activation_code(name: str) -> int:
    """Compile-time code of an activation name; a clear error for an unknown one."""
    try:
        return ACTIVATIONS.index(name)
    except ValueError:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}") from None


@triton.jit
def expm1(v):
    """exp(v) - 1 without the cancellation near 0 (Kahan's trick: accurate to a few ulp at any
    precision, since the rounding error of u = exp(v) cancels in (u - 1) / log(u))."""
    u = tl.exp(v)
    um1 = u - 1.0
    safe = tl.where((u == 1.0) | (um1 == -1.0), 2.0, u)  # log(safe) != 0 on the unused lanes
    r = um1 * v / tl.log(safe)
    r = tl.where(u == 1.0, v, r)
    return tl.where(um1 == -1.0, -1.0, r)


@triton.jit
def log1p(v):
    """log(1 + v) for v >= 0 without cancellation (Goldberg's trick, as expm1)."""
    u = 1.0 + v
    safe = tl.where(u == 1.0, 2.0, u)  # safe - 1 != 0 on the unused lanes
    r = tl.log(safe) * v / (safe - 1.0)
    r = tl.where(u == 1.0, v, r)
    # log1p(inf) = inf: inf / inf above is NaN
    return tl.where(u == float("inf"), u, r)


@triton.jit
def activate(v, ACTIVATION: tl.constexpr):
    """act(v) for a float32/float64 tensor; NaN propagates like torch's activations."""
    if ACTIVATION == 1:  # tanh(|v|) = -e / (2 + e), e = expm1(-2|v|)
        e = expm1(-2.0 * tl.abs(v))
        t = -e / (2.0 + e)
        v = tl.where(v < 0, -t, t)
    elif ACTIVATION == 2:  # relu; NaN < 0 is False, so NaN stays
        v = tl.where(v < 0, 0.0, v)
    elif ACTIVATION == 3:  # torch softplus (beta 1, threshold 20)
        # where, not minimum, for the clamps: minimum may drop a NaN
        v = tl.where(v > 20.0, v, log1p(tl.exp(tl.where(v > 20.0, 20.0, v))))
    elif ACTIVATION == 4:
        v = 1.0 / (1.0 + tl.exp(-v))
    elif ACTIVATION == 5:  # elu, alpha 1
        v = tl.where(v > 0, v, expm1(tl.where(v > 0, 0.0, v)))
    return v


@triton.jit
def nonfinite(v):
    """True where v is NaN or +-Inf."""
    return (v != v) | (tl.abs(v) == float("inf"))


@triton.jit
def store_output(acc, y_ptr, bias_ptr, offs_b, offs_n, b_ok, n_ok, N, HAS_BIAS: tl.constexpr,
                 ACTIVATION: tl.constexpr):
    """The fused epilogue: y[b, n] = act(acc[b, n] + bias[n]) cast to y's dtype.

    acc (BLOCK_B, BLOCK_N) in the accumulator dtype; offs_b (BLOCK_B,) batch rows, offs_n
    (BLOCK_N,) output features, b_ok/n_ok their bounds; y is (B, N) row-major.
    """
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        acc = acc + bias.to(acc.dtype)[None, :]
    acc = activate(acc, ACTIVATION)
    ptrs = y_ptr + offs_b.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & n_ok[None, :])
