"""Activation functions by name and their derivatives, shared by the models (fields and their
forward-mode Jacobian products) and the ops (the kernels' fused epilogue and its backward)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda v: v,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "swish": F.silu,  # x * sigmoid(x), FFJORD's swish with beta fixed at 1
}

# d act / d pre written with the output y = act(pre) only (so a fused kernel's output suffices);
# None for identity. Activations missing here need the pre-activation (see `derivative`).
GRADS_FROM_OUTPUT: dict[str, Callable[[Tensor], Tensor] | None] = {
    "identity": None,
    "tanh": lambda y: 1 - y * y,
    "relu": lambda y: (y > 0).to(y.dtype),
    "softplus": lambda y: -torch.expm1(-y),  # sigmoid(x) = 1 - exp(-softplus(x))
    "sigmoid": lambda y: y * (1 - y),
    "elu": lambda y: torch.where(y > 0, torch.ones_like(y), y + 1),
}


def _swish_grad(pre: Tensor) -> Tensor:
    s = torch.sigmoid(pre)
    return s + pre * s * (1 - s)


GRADS_FROM_INPUT: dict[str, Callable[[Tensor], Tensor]] = {"swish": _swish_grad}


def derivative(name: str, pre: Tensor | None, out: Tensor) -> Tensor:
    """act'(pre) for activation ``name``; ``pre`` may be None for those in GRADS_FROM_OUTPUT."""
    from_output = GRADS_FROM_OUTPUT.get(name)
    if from_output is not None:
        return from_output(out)
    if name == "identity":
        return torch.ones_like(out)
    if name in GRADS_FROM_INPUT and pre is not None:
        return GRADS_FROM_INPUT[name](pre)
    raise ValueError(f"no derivative of activation {name!r} from {'its output' if pre is None else 'its input'}")
