"""The ``torch.library`` ops of every format and primitive: ``sparseode::<format>_<primitive>``
(``csr_spmm``, ``bsr_sddmm``, ``masked_spmm_t``, ...), with their fake kernels, autograd formulas
and the pure-PyTorch reference as the fallback kernel (CompositeExplicitAutograd).

The schemas are declared in csrc/ops.cpp; :data:`SCHEMAS` states the same strings (built from the
pattern types' fields, the order the ops take the pattern tensors in), and defines the ops from
Python when ``sparseode._C`` is not built, so that both cases have the same ops. A test checks
that the two agree. Compiled kernels are registered per dispatch key beside their sources
(csrc/cpu/register_cpu.cpp, csrc/cuda); other backends (Triton, the reference on a device that has
compiled kernels) are switched in by ``sparseode.ops.select``.

Every backward is written with the ops themselves, so second derivatives (CNF training through a
vector-Jacobian product) work on every backend. With sparseode._C built, these formulas run in C++
(csrc/autograd_ops.cpp, the Autograd key); here they are written once more in Python for a build
without it (a test checks that both agree):

* ``spmm``    y = act(x W^T + b):  dx = spmm_t(dy', W), dW = sddmm(dy', x), db = sum(dy'),
  with dy' = dy * act'(y); ``spmm_fm`` the same, feature-major, act' on the first act_cols columns
* ``spmm_t``  z = g W:             dg = spmm(dz, W),     dW = sddmm(g, dz)
* ``sddmm``   v = P o (a^T c):     da = spmm(c, V),      dc = spmm_t(a, V), V the weight of dv
"""
from __future__ import annotations

from typing import Callable

import torch
from sparseode.ops import extension, reference, select, tangents
from sparseode.ops.handlers import FORMAT_HANDLERS, PRIMITIVES, FormatHandler

ACTIVATIONS: tuple[str, ...] = tuple(reference.ACTIVATION_FNS)
_ACT_GRAD = reference.ACTIVATION_GRADS_FROM_OUTPUT


def _signature(h: FormatHandler, primitive: str) -> str:
    pattern = ", ".join(f"Tensor {name}" for name in h.pattern_type._fields)
    return {
        "spmm": f"(Tensor x, Tensor values, {pattern}, Tensor? bias, str activation) -> Tensor",
        "spmm_fm": f"(Tensor xT, Tensor values, {pattern}, Tensor? bias, str activation, int act_cols) -> Tensor",
        "spmm_t": f"(Tensor g, Tensor values, {pattern}) -> Tensor",
        "sddmm": f"(Tensor a, Tensor c, {pattern}) -> Tensor",
    }[primitive]


SCHEMAS: dict[str, str] = {h.op_name(p): h.op_name(p) + _signature(h, p) for h in FORMAT_HANDLERS.values() for p in PRIMITIVES}


# --- fake kernels ---------------------------------------------------------------------------------
def fake_kernels(h: FormatHandler) -> dict[str, Callable]:
    """op name -> the fake kernel of the format's ops (shapes only)."""
    n, typed = len(h.pattern_type._fields), h.pattern_type

    def spmm(x, values, *rest):
        return x.new_empty((x.shape[0], h.shape(typed(*rest[:n]))[0]))

    def spmm_fm(xT, values, *rest):
        return xT.new_empty((h.shape(typed(*rest[:n]))[0], xT.shape[1]))

    def spmm_t(g, values, *pattern):
        return g.new_empty((g.shape[0], h.shape(typed(*pattern))[1]))

    def sddmm(a, c, *pattern):
        return a.new_empty(h.values_shape(typed(*pattern)))

    return {h.op_name("spmm"): spmm, h.op_name("spmm_fm"): spmm_fm, h.op_name("spmm_t"): spmm_t,
            h.op_name("sddmm"): sddmm}


# --- autograd -------------------------------------------------------------------------------------
def register_autograd(h: FormatHandler, ops: dict[str, torch._ops.OpOverload], prefix: str = "",
                      skip: frozenset[str] = frozenset(), lib: torch.library.Library | None = None) -> None:
    """The formulas above in Python on ``sparseode::<prefix><op>`` for the ops of format ``h``
    but those in ``skip``, written with ``ops`` (op name -> the op the backward calls).
    sparseode._C registers the same formulas in C++ for the Autograd key of the ops
    (csrc/autograd_ops.cpp: a call then records no Python at all), which are skipped; ``prefix``
    "triton_" registers them on the Triton twins (sparseode/ops/triton.py), whose backward then
    calls twins too. With ``lib`` the registrations live (and end) with that library, and a
    forward-mode tangent is refused as in C++ (sparseode/ops/tangents.py). Not on the twins
    (custom ops, whose Autograd kernel torch installs itself): a layer pinned to Triton drops one."""
    n = len(h.pattern_type._fields)
    spmm, spmm_t, sddmm = ops[h.op_name("spmm")], ops[h.op_name("spmm_t")], ops[h.op_name("sddmm")]
    none = (None,) * n

    def setup_spmm(ctx, inputs, output):
        x, values, *rest = inputs
        pattern, (bias, activation, *act_cols) = rest[:n], rest[n:]
        keep = _ACT_GRAD[activation] is not None
        ctx.save_for_backward(x, values, output if keep else None, *pattern)
        ctx.activation, ctx.act_cols = activation, act_cols[0] if act_cols else None

    def spmm_backward(ctx, grad):
        x, values, y, *pattern = ctx.saved_tensors
        need_x, need_values, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2 + n]
        act_grad = _ACT_GRAD[ctx.activation]
        if ctx.act_cols is None:  # batch-major (B, N)
            grad = grad * act_grad(y) if act_grad is not None else grad
            gx = spmm_t(grad, values, *pattern) if need_x else None
            gv = sddmm(grad, x, *pattern) if need_values else None
            gb = grad.sum(0) if need_bias else None
            return gx, gv, *none, gb, None
        k = ctx.act_cols  # feature-major (N, B), act' on the first k columns only
        if act_grad is not None and k:
            grad = torch.cat([grad[:, :k] * act_grad(y[:, :k]), grad[:, k:]], dim=1)
        gx = spmm_t(grad.t(), values, *pattern).t() if need_x else None
        gv = sddmm(grad.t(), x.t(), *pattern) if need_values else None
        gb = grad[:, :k].sum(1) if need_bias else None
        return gx, gv, *none, gb, None, None

    def setup_pair(ctx, inputs, output):
        first, second, *pattern = inputs
        ctx.save_for_backward(first, second, *pattern)

    def spmm_t_backward(ctx, grad):
        g, values, *pattern = ctx.saved_tensors
        gg = spmm(grad, values, *pattern, None, "identity") if ctx.needs_input_grad[0] else None
        gv = sddmm(g, grad, *pattern) if ctx.needs_input_grad[1] else None
        return gg, gv, *none

    def sddmm_backward(ctx, grad):
        a, c, *pattern = ctx.saved_tensors
        ga = spmm(c, grad, *pattern, None, "identity") if ctx.needs_input_grad[0] else None
        gc = spmm_t(a, grad, *pattern) if ctx.needs_input_grad[1] else None
        return ga, gc, *none

    for prim, backward, setup in (("spmm", spmm_backward, setup_spmm), ("spmm_fm", spmm_backward, setup_spmm),
                                  ("spmm_t", spmm_t_backward, setup_pair), ("sddmm", sddmm_backward, setup_pair)):
        if h.op_name(prim) in skip:
            continue
        qualname = f"sparseode::{prefix}{h.op_name(prim)}"
        if lib is None:  # the Triton twins: custom ops, whose own autograd kernel takes the formulas
            torch.library.register_autograd(qualname, backward, setup_context=setup)
        else:
            tangents.register_autograd(qualname, backward, setup, lib)


def kernel_registered(name: str, dispatch_key: str) -> bool:
    """True when op ``name`` has a kernel registered directly for ``dispatch_key`` (e.g. "CPU")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseode::{name}", dispatch_key)


# --- definition and registration (once, at import) ------------------------------------------------
def _define() -> tuple[torch.library.Library, dict[str, torch._ops.OpOverload]]:
    """Define the ops that sparseode._C did not, check those it did, register the reference,
    fakes and autograd. Returns the library (kept alive) and op name -> OpOverload."""
    extension.load()
    lib = torch.library.Library("sparseode", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        if hasattr(torch.ops.sparseode, name):
            built = str(getattr(torch.ops.sparseode, name).default._schema)
            if built != f"sparseode::{schema}":
                raise RuntimeError(f"sparseode._C declares {built}, this package expects sparseode::{schema}: "
                                   "the extension is stale, rebuild it (pip install --no-build-isolation -e .)")
        else:
            lib.define(schema)
    ops = {name: getattr(torch.ops.sparseode, name).default for name in SCHEMAS}
    in_cpp = frozenset(name for name in SCHEMAS if kernel_registered(name, "Autograd"))  # csrc/autograd_ops.cpp
    for h in FORMAT_HANDLERS.values():
        for name, fn in reference.reference_kernels(h).items():
            lib.impl(name, fn, "CompositeExplicitAutograd")
        for name, fn in fake_kernels(h).items():
            torch.library.register_fake(f"sparseode::{name}", fn, lib=lib)
        register_autograd(h, ops, skip=in_cpp, lib=lib)
    return lib, ops


_LIB, OPS = _define()
select.default("cpu")  # resolved now, not inside a layer's first call (which may be compiled)
if torch.cuda.is_available() and select.default("cuda") == "torch":
    from sparseode.ops import dispatch

    if dispatch.status("triton").available:  # no compiled CUDA kernels: Triton's are the GPU default
        select.set_gpu_backend("triton")


_BY_FORMAT = {(h.name, p): OPS[h.op_name(p)] for h in FORMAT_HANDLERS.values() for p in PRIMITIVES}


def op(fmt: str, primitive: str) -> torch._ops.OpOverload:
    """The op of ``primitive`` for format ``fmt``."""
    return _BY_FORMAT[fmt, primitive]
