"""Which backend runs the ops on each device type: an explicit, process-wide setting.

Every op has at most one kernel per dispatch key. By default that is the compiled one
(``sparseode._C``: the C++ kernels on the CPU, the CUDA kernels on a GPU) and, where none is
compiled, the reference. :func:`set_backend` / :func:`use_backend` put another backend's kernels
(Triton, or the reference) in front of the default for one device type, by registering them for
that dispatch key, and take them away again; switching costs registration work (about 0.2 ms
for a use_backend block, bench/op_overhead.py), running costs nothing extra. The setting is
process-wide, not per thread; a backward runs on the backend selected when it runs. A
``SparseLinear`` pinned to "torch" or "triton" calls that backend's own ops and never switches.

    sparseode.ops.set_gpu_backend("triton")        # every op on CUDA tensors runs on Triton
    with sparseode.ops.use_backend("torch"):       # the reference on the CPU, inside the block
        ...
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_DEFAULT: dict[str, str] = {}
_ACTIVE: dict[str, str] = {}
_OVERRIDE: dict[str, torch.library.Library] = {}


def _check_device_type(device_type: str) -> str:
    if device_type not in _KEYS:
        raise ValueError(f"device_type must be one of {', '.join(_KEYS)}; got {device_type!r}")
    return device_type


def default(device_type: str) -> str:
    """The backend whose kernels are registered for ``device_type`` when nothing is switched in."""
    if device_type not in _DEFAULT:
        from sparseode.ops import dispatch

        compiled = "cpu" if device_type == "cpu" else "cuda"
        _DEFAULT[device_type] = compiled if dispatch.status(compiled).available else "torch"
    return _DEFAULT[device_type]


def active(device_type: str) -> str:
    """The backend that runs the ops on ``device_type`` tensors now ("cpu", "cuda", "triton", "torch")."""
    return _ACTIVE.get(device_type) or default(device_type)


def switched(device_type: str) -> bool:
    """True when :func:`set_backend` put a backend other than the default in front on ``device_type``."""
    return device_type in _ACTIVE


def set_backend(name: str, device_type: str | None = None) -> None:
    """Run every sparseode op on ``device_type`` tensors with backend ``name`` from now on.

    ``device_type`` defaults to the backend's own ("cpu" for cpu and torch, "cuda" for cuda and
    triton; triton on "cpu" runs through its interpreter, a testing aid). A clear error when the
    backend is unknown, unavailable here, or does not run on that device type.
    """
    from sparseode.ops import dispatch

    be = dispatch.get(name)
    device_type = _check_device_type(device_type or be.device_types[0])
    if device_type not in be.device_types:
        raise ValueError(f"backend {name!r} does not run on {device_type} tensors "
                         f"(it runs on {', '.join(be.device_types)})")
    be.family()  # built now (a layer calls a backend's own ops), not inside a compiled call
    if active(device_type) == name:
        return
    lib = _OVERRIDE.pop(device_type, None)
    if lib is not None:
        lib._destroy()
    _ACTIVE.pop(device_type, None)
    if name != default(device_type):
        lib = torch.library.Library("sparseode", "IMPL")
        with warnings.catch_warnings():  # overriding the compiled kernel is the point here
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            for op_name, fn in be.kernels().items():
                lib.impl(op_name, fn, _KEYS[device_type])
        _OVERRIDE[device_type] = lib
        _ACTIVE[device_type] = name


def set_gpu_backend(name: str) -> None:
    """The backend of the ops on CUDA tensors: "cuda" (csrc/cuda kernels), "triton" or "torch"."""
    set_backend(name, "cuda")


@contextlib.contextmanager
def use_backend(name: str, device_type: str | None = None) -> Iterator[None]:
    """:func:`set_backend` inside a ``with`` block; the previous backend comes back on exit."""
    from sparseode.ops import dispatch

    device_type = _check_device_type(device_type or dispatch.get(name).device_types[0])
    before = active(device_type)
    set_backend(name, device_type)
    try:
        yield
    finally:
        set_backend(before, device_type)


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` ("auto" or a backend name) on ``device``: "auto" is the
    backend selected for that device type."""
    if name != "auto":
        from sparseode.ops import dispatch

        dispatch.get(name)
        return name
    return active(device.type)
