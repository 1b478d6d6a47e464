"""``torch.library.register_autograd`` that refuses forward-mode tangents instead of dropping them.

The ops have backward formulas only. A forward-mode tangent (``torch.func.jvp``,
``torch.autograd.forward_ad``) does not make an input require grad, so the kernel that
``register_autograd`` installs runs the op without a node and returns a result with no tangent:
``jvp`` reads zeros, a silent wrong answer. sparseode._C refuses such a tangent in its Autograd
kernel (csrc/autograd_ops.cpp, ``records``); :func:`register_autograd` puts the same check, with
the same message, in front of the Python kernel.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import forward_ad
from torch._library.autograd import Info, make_autograd_impl

__all__ = ["check_no_tangents", "register_autograd"]


def check_no_tangents(op_name: str, arg_names: tuple[str, ...], args: tuple) -> None:
    """Raise ``RuntimeError`` naming the argument of op ``op_name`` ("sparseode::csr_spmm") that
    carries a forward-mode tangent; ``arg_names`` are the schema's argument names, in order."""
    if forward_ad._current_level < 0:  # no dual level open (torch.func.jvp opens one too): no tangents
        return
    for name, value in zip(arg_names, args):
        values = value if isinstance(value, (list, tuple)) else (value,)  # Tensor[] / Tensor?[] arguments
        if any(isinstance(v, torch.Tensor) and torch._unpack_dual(v, 0).tangent is not None for v in values):
            raise RuntimeError(f"{op_name}: argument {name} carries a forward-mode tangent, and "
                               "sparseode's ops have no forward-mode AD formula (feature-major spmm_fm takes "
                               "tangent directions as extra columns)")


def register_autograd(qualname: str, backward: Callable, setup_context: Callable,
                      lib: torch.library.Library) -> None:
    """``torch.library.register_autograd(qualname, backward, setup_context=...)`` on ``lib``, with
    :func:`check_no_tangents` run on every call first. ``qualname`` is "namespace::name"."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    kernel = make_autograd_impl(op, Info(backward, setup_context))
    arg_names = tuple(arg.name for arg in op._schema.arguments)

    def checked(keyset: torch._C.DispatchKeySet, *args, **kwargs):
        check_no_tangents(qualname, arg_names, args)
        return kernel(keyset, *args, **kwargs)

    lib.impl(name, checked, "Autograd", with_keyset=True)
