"""The ``triton`` backend: the Triton kernels of ``sparseode.kernels`` (kernels/ in the source tree)
for the ``masked``, ``csr`` and ``bsr`` ops.

Each op has a Triton twin, ``sparseode::triton_<op>`` (same schema), made with
``torch.library.triton_op`` on first use (:func:`family`): its fake kernel and autograd formulas are
those of the op (sparseode/ops/library.py), and ``torch.compile`` traces into its kernels (they
launch through ``torch.library.wrap_triton``), so Inductor sees the Triton kernels themselves. The
op's dispatch key runs the twin while the backend is selected for a device
(``sparseode.ops.set_gpu_backend("triton")``); a layer pinned to ``"triton"`` calls the twins
directly, whatever is selected.

On a GPU the kernels are compiled and autotuned on first use. Without one they run only through
Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported), a testing aid that
takes CPU tensors and is far slower than the ``cpu`` backend. Neither this module nor ``status``
imports triton: the kernels load on the first call.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from typing import Callable, Optional

import torch

from sparseode.ops.backend import Backend
from sparseode.ops.handlers import FORMAT_HANDLERS, FormatHandler


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch():
    return importlib.import_module("sparseode.kernels.launch")


def _format_kernels(h: FormatHandler) -> dict[str, Callable]:
    """The ops of one format on the launch functions of the same names (the pattern tensors
    arrive flat, in field order). spmm_fm transposes around spmm."""
    n, typed = len(h.pattern_type._fields), h.pattern_type
    name = h.name

    def spmm(x, values, *rest):
        return getattr(_launch(), f"{name}_spmm")(x, values, typed(*rest[:n]), *rest[n:])

    def spmm_fm(xT, values, *rest):
        from sparseode.ops.reference import column_epilogue

        bias, activation, act_cols = rest[n:]
        y = getattr(_launch(), f"{name}_spmm")(xT.t(), values, typed(*rest[:n]), None, "identity").t()
        return column_epilogue(y, bias, activation, act_cols)

    def spmm_t(g, values, *pattern):
        return getattr(_launch(), f"{name}_spmm_t")(g, values, typed(*pattern))

    def sddmm(a, c, *pattern):
        return getattr(_launch(), f"{name}_sddmm")(a, c, typed(*pattern))

    return {h.op_name("spmm"): spmm, h.op_name("spmm_fm"): spmm_fm, h.op_name("spmm_t"): spmm_t,
            h.op_name("sddmm"): sddmm}


_TYPES = {"Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "str": str, "int": int}


def _signature(schema: str) -> inspect.Signature:
    """The Python signature ``triton_op`` infers ``schema`` ("name(Tensor x, ...) -> Tensor") from."""
    args = schema[schema.index("(") + 1: schema.index(") ->")].split(", ")
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_TYPES[kind])
              for kind, name in (a.rsplit(" ", 1) for a in args)]
    return inspect.Signature(params, return_annotation=torch.Tensor)


def _opaque(mode, op, types, args, kwargs):
    # Under the interpreter the kernels need real tensors: compiled graphs keep the twin as one op.
    return mode.__torch_dispatch__(op, types, args, kwargs)


_TWINS: dict[str, torch._ops.OpOverload] = {}


def family() -> dict[str, torch._ops.OpOverload]:
    """op name (``csr_spmm``) -> its Triton twin ``sparseode::triton_csr_spmm``, defined on first
    call with ``torch.library.triton_op``, the op's fake kernel and its autograd formulas."""
    if _TWINS:  # a plain dict, not functools.cache: torch.compile traces through this lookup
        return _TWINS
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    from sparseode.ops import library

    twins = {}
    for h in FORMAT_HANDLERS.values():
        fakes = library.fake_kernels(h)
        for name, fn in _format_kernels(h).items():
            fn.__signature__ = _signature(library.SCHEMAS[name])
            opdef = torch.library.triton_op(f"sparseode::triton_{name}", fn, mutates_args=())
            opdef.register_fake(fakes[name])  # exact shapes, without running launch code on fake tensors
            if _interpreting():
                opdef.register_torch_dispatch(FunctionalTensorMode, _opaque)
            twins[name] = getattr(torch.ops.sparseode, f"triton_{name}").default
        library.register_autograd(h, twins, prefix="triton_")
    _TWINS.update(twins)
    return _TWINS


class TritonBackend(Backend):
    """Every op on Triton kernels.

    dtypes: float32 (tf32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set), float16,
    bfloat16 and float64, accumulating in float32 (float64 for float64). Devices: CUDA, and the CPU
    under the interpreter.
    """

    name = "triton"
    formats = ("masked", "csr", "bsr")
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    @property
    def device_types(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    def status(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if not _interpreting() and not torch.cuda.is_available():
            return False, "no GPU; set TRITON_INTERPRET=1 to run through the interpreter"
        return True, ""

    def kernels(self) -> dict[str, Callable]:
        return dict(family())

    def family(self) -> dict[str, Callable]:
        return family()


TRITON = TritonBackend()
