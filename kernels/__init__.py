"""Triton kernels of sparseode, installed as ``sparseode.kernels``.

* ``block.py``: block-structured matmuls on ``tl.dot`` for the ``bsr`` format (stored-block lists)
  and the ``masked`` format (dense values walked in tiles, empty tiles skipped);
* ``csr.py``: gather kernels for unstructured ``csr`` weights;
* ``epilogue.py``: the fused bias + activation epilogue; ``nonfinite.py``: dense NaN/Inf semantics;
* ``tuning.py``: autotuned launch configurations (one fixed configuration in the interpreter);
* ``launch.py``: the entry points ``spmm``, ``spmm_t`` and ``sddmm`` for every format.

Importing this package does not import triton: the entry points load ``launch`` (and with it
triton and the kernels) on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["spmm", "spmm_t", "sddmm"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.launch"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
