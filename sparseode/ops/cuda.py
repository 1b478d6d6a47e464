"""The CUDA kernels of ``sparseode._C`` (csrc/cuda), registered under the same ops as the CPU ones."""
from __future__ import annotations

import torch

from sparseode.ops.cpu import CompiledBackend


class CudaBackend(CompiledBackend):
    def status(self) -> tuple[bool, str]:
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU build (no CUDA)"
        ok, why = super().status()
        if not ok:
            return ok, why
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        return True, ""


CUDA = CudaBackend("cuda", "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16))
