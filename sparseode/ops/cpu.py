"""Backends on the compiled extension ``sparseode._C``: its CPU kernels (csrc/cpu) and, where it
was built with them, its CUDA kernels (csrc/cuda), registered by the extension itself for the
CPU and CUDA dispatch keys of the ``csr_*`` and ``bsr_*`` ops (``masked_*`` runs on the reference,
where a dense matmul *is* the right kernel)."""
from __future__ import annotations

import torch

from sparseode.ops import extension
from sparseode.ops.backend import Backend


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
        if not torch._C._dispatch_has_kernel_for_dispatch_key("sparseode::csr_spmm", key):
            return False, f"sparseode._C was built without {key} kernels"
        return True, ""


CPU = CompiledBackend("cpu", "cpu", (torch.float32, torch.float64))
