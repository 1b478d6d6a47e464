"""Backends on the compiled extension ``sparseode._C``: its CPU kernels (csrc/cpu) and, where it
was built with them, its CUDA kernels (csrc/cuda) — the same ``torch.ops.sparseode`` ops, picked by
the tensors' device."""
from __future__ import annotations

import torch
from torch import Tensor

from sparseode.ops import extension
from sparseode.ops.backend import Backend
from sparseode.ops.layout import block_of


class CompiledBackend(Backend):
    formats = ("csr", "bsr")

    def __init__(self, name: str, device_type: str, dtypes: tuple) -> None:
        self.name = name
        self.device_types = (device_type,)
        self.dtypes = dtypes

    def status(self) -> tuple[bool, str]:
        ok, why = extension.load()
        if not ok:
            return False, why
        key = self.device_types[0].upper()
        if not torch._C._dispatch_has_kernel_for_dispatch_key("sparseode::bsr_spmm", key):
            return False, f"sparseode._C was built without {key} kernels"
        return True, ""

    def _spmm(self, x: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str,
              activation: str) -> Tensor:
        return torch.ops.sparseode.bsr_spmm(x, values, pattern[0], pattern[1], bias, activation)

    def _spmm_fm(self, xT: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str,
                 activation: str, act_cols: int) -> Tensor:
        return torch.ops.sparseode.bsr_spmm_fm(xT, values, pattern[0], pattern[1], bias, activation, act_cols)

    def _spmm_t(self, g: Tensor, values: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
        return torch.ops.sparseode.bsr_spmm_t(g, values, pattern[2], pattern[3], pattern[4])

    def _sddmm(self, a: Tensor, c: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
        bh, bw = block_of(fmt, pattern)
        return torch.ops.sparseode.bsr_sddmm(a, c, pattern[0], pattern[1], bh, bw)


CPU = CompiledBackend("cpu", "cpu", (torch.float32, torch.float64))
CPU.feature_major = True  # csrc/cpu has bsr_spmm_fm; the CUDA kernels do not (yet)
