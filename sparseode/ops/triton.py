"""The ``triton`` backend: the Triton kernels of ``sparseode.kernels`` (kernels/ in the source tree)
for the ``masked``, ``csr`` and ``bsr`` ops, registered for a device's dispatch key while selected
(``sparseode.ops.set_gpu_backend("triton")``).

On a GPU the kernels are compiled and autotuned on first use. Without one they run only through
Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported), a testing aid that
takes CPU tensors and is far slower than the ``cpu`` backend. Neither this module nor ``status``
imports triton: the kernels load on the first call.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

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
        return {op: fn for h in FORMAT_HANDLERS.values() for op, fn in _format_kernels(h).items()}


TRITON = TritonBackend()
