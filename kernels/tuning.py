"""Launch configurations: ``triton.autotune`` on a GPU, one fixed configuration in the interpreter.

Each kernel gets a :class:`Launcher` built once per process. On a GPU it autotunes over the
configurations below, keyed on the problem's shape; the winner is kept for the process and on disk
in Triton's cache (keyed by the GPU architecture, Triton version and kernel source), so a layer is
tuned once per machine, not once per run. Under ``TRITON_INTERPRET=1`` nothing is timed: the interpreter runs
the one configuration given, chosen to keep the number of programs (Python iterations) small.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import torch
import triton
from torch.library import wrap_triton

from .grid import checked


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(num_warps: int = 4, num_stages: int = 2, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Block kernels: the batch tile, warps and pipeline stages; the block itself is the format's.
BLOCK_SPMM_CONFIGS = [
    _cfg(4, 2, BLOCK_B=32), _cfg(4, 3, BLOCK_B=64), _cfg(4, 4, BLOCK_B=64), _cfg(4, 3, BLOCK_B=128),
    _cfg(8, 3, BLOCK_B=128), _cfg(8, 4, BLOCK_B=128), _cfg(8, 3, BLOCK_B=256),
]
BLOCK_SDDMM_CONFIGS = [
    _cfg(4, 2, BLOCK_B=32), _cfg(4, 3, BLOCK_B=64), _cfg(4, 3, BLOCK_B=128), _cfg(8, 4, BLOCK_B=128),
]
CSR_SPMM_CONFIGS = [
    _cfg(4, 2, BLOCK_B=64, ROWS=8, BLOCK_NNZ=16), _cfg(4, 2, BLOCK_B=128, ROWS=4, BLOCK_NNZ=16),
    _cfg(4, 2, BLOCK_B=32, ROWS=16, BLOCK_NNZ=16), _cfg(8, 2, BLOCK_B=128, ROWS=8, BLOCK_NNZ=8),
    _cfg(8, 2, BLOCK_B=256, ROWS=4, BLOCK_NNZ=8), _cfg(4, 2, BLOCK_B=64, ROWS=16, BLOCK_NNZ=8),
]
CSR_SDDMM_CONFIGS = [
    _cfg(4, 2, BLOCK_NNZ=32, BLOCK_B=64), _cfg(4, 2, BLOCK_NNZ=64, BLOCK_B=64),
    _cfg(4, 2, BLOCK_NNZ=16, BLOCK_B=128), _cfg(8, 2, BLOCK_NNZ=64, BLOCK_B=128),
]

# The interpreter runs programs one after another in Python: few, large programs are fastest.
INTERPRETER_CONFIGS = {
    "block_spmm": _cfg(BLOCK_B=64),
    "block_sddmm": _cfg(BLOCK_B=64),
    "csr_spmm": _cfg(BLOCK_B=64, ROWS=16, BLOCK_NNZ=16),
    "csr_sddmm": _cfg(BLOCK_NNZ=128, BLOCK_B=64),
}

# Largest accumulator-plus-operand tile, in elements, worth trying for the block kernels (larger
# ones spill registers): configurations over it are pruned before timing.
_MAX_TILE = 128 * 64


def _prune_block(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    width = max(kwargs.get("BH", 16), kwargs.get("BW", 16))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] * width <= _MAX_TILE]
    return kept or configs[:1]


class Launcher:
    """``launcher(grid, **kwargs)`` runs ``kernel[grid](**kwargs)`` with a tuned configuration.

    ``grid`` is a function of the configuration's meta-parameters (a dict), as for Triton kernels;
    the grid it returns is checked against CUDA's limits (grid.py) before the launch.
    """

    def __init__(self, name: str, kernel: Any, configs: Sequence[triton.Config], key: list[str],
                 prune: Callable | None = None) -> None:
        self.name = name
        self.kernel = kernel
        self.fixed = INTERPRETER_CONFIGS[name] if interpreting() else None
        self.tuned = None
        if self.fixed is None:
            prune_by = {"early_config_prune": prune} if prune is not None else None
            self.tuned = triton.autotune(configs=list(configs), key=key, prune_configs_by=prune_by,
                                         cache_results=True)(kernel)

    def __call__(self, grid: Callable[[dict[str, Any]], tuple[int, ...]], **kwargs: Any) -> None:
        # wrap_triton: a graph traced by torch.compile records the kernel itself (eager calls of
        # the triton_op twins, sparseode/ops/triton.py, launch it directly)
        grid = checked(self.name, grid)
        if self.tuned is not None:
            wrap_triton(self.tuned)[grid](**kwargs)
            return
        cfg = self.fixed
        wrap_triton(self.kernel)[grid](**kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@functools.cache
def launcher(name: str) -> Launcher:
    """The process-wide launcher of kernel ``name`` (block_spmm, block_sddmm, csr_spmm, csr_sddmm)."""
    from . import block, csr

    if name == "block_spmm":
        return Launcher(name, block.block_spmm_kernel, BLOCK_SPMM_CONFIGS,
                        ["B", "N", "K", "BH", "BW", "LIST"], _prune_block)
    if name == "block_sddmm":
        return Launcher(name, block.block_sddmm_kernel, BLOCK_SDDMM_CONFIGS,
                        ["B", "N", "K", "BH", "BW", "LIST"], _prune_block)
    if name == "csr_spmm":
        return Launcher(name, csr.csr_spmm_kernel, CSR_SPMM_CONFIGS, ["B", "N", "K"])
    if name == "csr_sddmm":
        return Launcher(name, csr.csr_sddmm_kernel, CSR_SDDMM_CONFIGS, ["B", "nnz"])
    raise KeyError(name)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def batch_splits(n_items: int, B: int, device: torch.device) -> int:
    """How many batch ranges an sddmm splits into so that the GPU has enough programs.

    sddmm reduces over the batch, and a weight with few stored blocks gives few programs: the batch
    is then split, partial sums are written side by side and added (deterministically) afterwards.
    """
    if device.type != "cuda" or interpreting() or n_items == 0:
        return 1
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if n_items >= target:
        return 1
    return max(1, min(triton.cdiv(target, n_items), triton.cdiv(B, 512)))
