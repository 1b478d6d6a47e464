"""Loads the compiled extension ``sparseode._C`` once, on first use, and remembers why it failed."""
from __future__ import annotations

import importlib
import warnings

import torch

_STATE: dict[str, object] = {}


def load() -> tuple[bool, str]:
    """Import ``sparseode._C`` (registering its ops). Returns (loaded, reason if not).

    A missing or broken extension gives one warning; the ``torch`` backend then serves every op.
    """
    if "ok" not in _STATE:
        try:
            importlib.import_module("sparseode._C")
            _STATE.update(ok=True, why="")
        except ImportError as err:
            missing = isinstance(err, ModuleNotFoundError) and err.name == "sparseode._C"
            why = (
                "sparseode._C is not built (run `pip install --no-build-isolation .` in the source tree)"
                if missing
                else f"sparseode._C failed to load ({err}); rebuild it against the installed torch"
            )
            _STATE.update(ok=False, why=why)
            warnings.warn(f"{why}; falling back to the 'torch' backend", RuntimeWarning, stacklevel=3)
    return bool(_STATE["ok"]), str(_STATE["why"])


def cpu_capability() -> str | None:
    """The CPU kernel variant ``sparseode._C`` runs on this machine, or None without the extension.

    "default" (baseline x86-64), "avx2" or "avx512" in a portable build, picked from the CPU unless
    the environment variable SPARSEODE_CPU_CAPABILITY asks for a narrower one; "native" in a
    SPARSEODE_NATIVE=1 build (csrc/cpu/dispatch.h). A bad SPARSEODE_CPU_CAPABILITY raises RuntimeError.
    """
    if not load()[0]:
        return None
    return str(torch.ops.sparseode.cpu_capability())
