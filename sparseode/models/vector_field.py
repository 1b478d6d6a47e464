"""Vector fields f(t, x) for neural ODEs and continuous normalizing flows.

Every weight lives in an ordinary ``nn.Linear`` (directly, or as ``.linear``/``.gate``/
``.hyper_bias`` of the two time-conditioned layers), so pruning (``torch.nn.utils.prune``) and
``sparseode.sparsify`` see plain Linear modules and may replace them with a drop-in
``SparseLinear``. Layers therefore only ever *call* their Linear modules; they never index or
write a weight.

Shapes: ``x`` is ``(..., in_features)`` with any leading batch shape; ``t`` is a scalar (Python
number or 0-d / one-element tensor), or a tensor of per-sample times shaped ``x.shape[:-1]`` or
``x.shape[:-1] + (1,)``. Outputs keep ``x``'s leading shape and dtype.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparseode.activations import ACTIVATIONS as _ALL_ACTIVATIONS

__all__ = ["ACTIVATIONS", "TIME_MODES", "ConcatLinear", "ConcatSquashLinear", "MLPVectorField"]

#: Registry of activations by name (from sparseode.activations, where adding one is one entry).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {k: v for k, v in _ALL_ACTIVATIONS.items() if k != "identity"}

#: How a field sees time: None (autonomous), "concat" (t as an extra input column),
#: "concatsquash" (FFJORD's gated layer).
TIME_MODES: tuple[str | None, ...] = (None, "concat", "concatsquash")


def _time_column(t: Tensor | float, x: Tensor) -> Tensor:
    """Return t as a ``(..., 1)`` tensor broadcastable against ``x`` (dtype/device of x)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    if t.numel() == 1:
        return t.reshape((1,) * x.dim()).expand(*lead, 1)
    if t.shape == lead:
        return t.unsqueeze(-1)
    if t.shape == (*lead, 1):
        return t
    raise ValueError(
        f"t must be a scalar or have shape {tuple(lead)} or {(*lead, 1)} to match x of shape "
        f"{tuple(x.shape)}; got t of shape {tuple(t.shape)}"
    )


class ConcatLinear(nn.Module):
    """Linear layer that sees time as one more input column.

    ``y = linear(cat([x, t], -1)) = W[:, :in] x + W[:, in] t + b``; the **last** input column of
    ``self.linear`` multiplies t.

    Args:
        in_features: size of x's last dimension.
        out_features: size of the output's last dimension.
        bias: whether ``self.linear`` has a bias.

    Shapes: ``x (..., in_features)``, ``t`` scalar or per-sample -> ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.linear = nn.Linear(self.in_features + 1, self.out_features, bias=bias)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return self.linear(torch.cat([x, _time_column(t, x)], dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ConcatSquashLinear(nn.Module):
    """FFJORD's ``ConcatSquashLinear``: ``y = linear(x) * sigmoid(gate(t)) + hyper_bias(t)``.

    ``self.linear = nn.Linear(in, out)``, ``self.gate = nn.Linear(1, out)``,
    ``self.hyper_bias = nn.Linear(1, out, bias=False)``.

    Shapes: ``x (..., in_features)``, ``t`` scalar or per-sample -> ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.linear = nn.Linear(self.in_features, self.out_features, bias=bias)
        self.gate = nn.Linear(1, self.out_features)
        self.hyper_bias = nn.Linear(1, self.out_features, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        tt = _time_column(t, x)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.hyper_bias(tt)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


_LAYERS: dict[str | None, Callable[[int, int], nn.Module]] = {
    None: nn.Linear,
    "concat": ConcatLinear,
    "concatsquash": ConcatSquashLinear,
}


class MLPVectorField(nn.Module):
    """An MLP vector field ``f(t, x)``, called the way torchdiffeq calls it.

    Args:
        dim: state dimension d (input and output size).
        hidden: hidden widths, an int or a sequence (``()`` gives one d -> d layer).
        time: ``None`` (autonomous, plain ``nn.Linear`` layers, t ignored), ``"concat"``
            (``ConcatLinear``) or ``"concatsquash"`` (``ConcatSquashLinear``).
        activation: a name in :data:`ACTIVATIONS`; applied between layers, not after the last.

    Attributes:
        layers: ``nn.ModuleList`` of the layers in forward order.
        time, activation (its name), dim, hidden (tuple of widths).

    Shapes: ``forward(t, x)`` with ``x (..., dim)`` returns ``dx/dt (..., dim)``, same dtype.
    """

    def __init__(
        self,
        dim: int,
        hidden: int | Sequence[int] = (64, 64, 64),
        time: str | None = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"hidden must be a positive int or a sequence of positive ints, got {hidden!r}")
        if time not in _LAYERS:
            raise ValueError(f"time must be one of {list(_LAYERS)}, got {time!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.dim = dim
        self.hidden = widths
        self.time = time
        self.activation = activation
        sizes = (dim, *widths, dim)
        make = _LAYERS[time]
        self.layers = nn.ModuleList(make(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")
        act = ACTIVATIONS[self.activation]
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h) if self.time is None else layer(t, h)
            if i < last:
                h = act(h)
        return h

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON values) that rebuild this field (``sparseode.save``)."""
        return {"dim": self.dim, "hidden": list(self.hidden), "time": self.time, "activation": self.activation}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, time={self.time!r}, activation={self.activation!r}"
