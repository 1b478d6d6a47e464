"""The registry of backends (name -> Backend), what is usable here and why not the rest.

Backends are looked up by name and imported on first use, so importing sparseode never imports
triton or touches CUDA.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from sparseode.ops.backend import Backend

# name -> (module, attribute) of the Backend instance
_REGISTRY: dict[str, tuple[str, str]] = {
    "cpu": ("sparseode.ops.cpu", "CPU"),
    "cuda": ("sparseode.ops.cuda", "CUDA"),
    "triton": ("sparseode.ops.triton", "TRITON"),
    "torch": ("sparseode.ops.backend", "TORCH"),
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend is usable here and, if not, why."""

    available: bool
    reason: str

    def __str__(self) -> str:
        return "available" if self.available else f"unavailable: {self.reason}"


_STATUS: dict[str, BackendStatus] = {}


_LOADED: dict[str, Backend] = {}


def _load(name: str) -> Backend:
    if name not in _LOADED:
        module, attr = _REGISTRY[name]
        _LOADED[name] = getattr(importlib.import_module(module), attr)
    return _LOADED[name]


def status(name: str) -> BackendStatus:
    """Usability of one backend (computed once per process)."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or 'auto'; got {name!r}")
    if name not in _STATUS:
        try:
            ok, why = _load(name).status()
        except ImportError as err:
            ok, why = False, f"cannot import its module ({err})"
        _STATUS[name] = BackendStatus(ok, why)
    return _STATUS[name]


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and the reason when it is not.

    >>> {name: s.available for name, s in backends().items()}  # doctest: +SKIP
    {'cpu': True, 'cuda': False, 'triton': False, 'torch': True}
    """
    return {name: status(name) for name in BACKENDS}


def get(name: str) -> Backend:
    """The backend called ``name``; a clear error when it is unknown or not usable here."""
    st = status(name)
    if not st.available:
        raise RuntimeError(f"backend {name!r} is not available here: {st.reason}")
    return _load(name)
