"""Registers the fused-field Triton kernels (field_launch.py) as the CUDA kernels of
``sparseode::mlp_field`` and of its backward's feature-major products, the ops csrc/ops.cpp declares
(the CPU kernels are csrc/cpu's). Registration imports neither triton nor the kernels: they load on
the first call on a CUDA tensor, so importing sparseode stays lean.

Same mechanism as the per-layer Triton kernels (sparseode.ops.select): a ``torch.library.Library``
IMPL fragment holding the kernels for the CUDA dispatch key, here permanently, since no compiled
CUDA kernel of these ops exists to be the default.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch

#: The ops this module serves on CUDA -> the module (of sparseode.kernels) whose function of the
#: same name is the kernel. An op the extension does not declare is skipped (the backward's two
#: products were ops of their own before the backward became one op).
FIELD_OPS: dict[str, str] = {"mlp_field": "field_launch", "mlp_field_backward": "field_backward",
                             "field_spmm_t_fm": "field_launch", "field_sddmm_fm": "field_launch"}

_LIB: torch.library.Library | None = None
_REGISTERED: tuple[str, ...] = ()


def _lazy(name: str) -> Callable:
    module = f"sparseode.kernels.{FIELD_OPS[name]}"

    def kernel(*args):
        return getattr(importlib.import_module(module), name)(*args)

    kernel.__name__ = f"triton_{name}"
    return kernel


def _declared(name: str) -> bool:
    return hasattr(torch.ops.sparseode, name)


def register() -> tuple[str, ...]:
    """Register the CUDA kernels of the ops of FIELD_OPS that the extension declares and no other
    CUDA kernel serves (once per process); returns the op names registered. Without triton nothing
    is registered, and the ops have no CUDA kernel (a clear dispatcher error on CUDA tensors)."""
    global _LIB, _REGISTERED
    if _LIB is not None or importlib.util.find_spec("triton") is None:
        return _REGISTERED
    names = tuple(n for n in FIELD_OPS if _declared(n)
                  and not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseode::{n}", "CUDA"))
    lib = torch.library.Library("sparseode", "IMPL")
    for name in names:
        lib.impl(name, _lazy(name), "CUDA")
    _LIB, _REGISTERED = lib, names
    return names


def registered() -> tuple[str, ...]:
    """The ops whose CUDA kernel this module registered."""
    return _REGISTERED
