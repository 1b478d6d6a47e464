"""sparseode: prune continuous-depth models, then run the pruned layers on sparse kernels.

The public API (see README.md): ``data``, ``models``, ``prune`` (subpackages), ``sparsify``,
``densify``, ``save``/``load`` (checkpoints without pickled code) and ``backends``. Importing sparseode never imports triton or initialises CUDA;
subpackages load on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["data", "models", "prune", "nn", "sparsify", "densify", "save", "load", "backends", "__version__"]

_SUBMODULES = {"data", "models", "prune", "nn"}
_FUNCTIONS = {
    "sparsify": "sparseode.nn.convert",
    "densify": "sparseode.nn.convert",
    "save": "sparseode.checkpoint",
    "load": "sparseode.checkpoint",
    "backends": "sparseode.ops.dispatch",
}

if TYPE_CHECKING:  # pragma: no cover
    from sparseode import data, models, nn, prune
    from sparseode.checkpoint import load, save
    from sparseode.nn.convert import densify, sparsify
    from sparseode.ops.dispatch import backends


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"sparseode.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'sparseode' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
