"""The ``triton`` backend: the Triton kernels of ``sparseode.kernels`` (kernels/ in the source tree)
for the ``masked``, ``csr`` and ``bsr`` formats.

On a GPU the kernels are compiled and autotuned on first use. Without one they run only through
Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported), a testing aid that
takes CPU tensors and is far slower than the ``cpu`` backend. Neither this module nor ``status``
imports triton: the kernels load on the first call.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor

from sparseode.ops.backend import Backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    """spmm, spmm_t and sddmm on Triton kernels.

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

    @staticmethod
    def _kernels():
        return importlib.import_module("sparseode.kernels.launch")

    def _spmm(self, x: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str,
              activation: str) -> Tensor:
        return self._kernels().spmm(x, values, pattern, bias, fmt, activation)

    def _spmm_t(self, g: Tensor, values: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
        return self._kernels().spmm_t(g, values, pattern, fmt)

    def _sddmm(self, a: Tensor, c: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
        return self._kernels().sddmm(a, c, pattern, fmt)


TRITON = TritonBackend()
