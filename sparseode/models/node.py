"""Neural ODE blocks: :class:`NeuralODE` (solve a field) and :class:`ODEClassifier`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
try:  # the solver table is private to torchdiffeq; without it torchdiffeq reports bad names itself
    from torchdiffeq._impl.odeint import SOLVERS
except ImportError:  # pragma: no cover
    SOLVERS = None

from .solve import solve
from .vector_field import MLPVectorField

__all__ = ["NeuralODE", "ODEClassifier", "check_solver"]


def check_solver(method: str, rtol: float, atol: float) -> None:
    """Raise ``ValueError`` naming the argument when a solver setting is invalid."""
    if SOLVERS is not None and method not in SOLVERS:
        raise ValueError(f"method must be one of {sorted(SOLVERS)}, got {method!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_span(t: Sequence[float]) -> tuple[float, float]:
    try:
        t0, t1 = (float(v) for v in t)
    except (TypeError, ValueError):
        raise ValueError(f"t must be a pair (t0, t1) of numbers, got {t!r}") from None
    if t0 == t1:
        raise ValueError(f"t must span a non-empty interval, got t0 == t1 == {t0}")
    return t0, t1


class NeuralODE(nn.Module):
    """Solve ``dx/dt = field(t, x)`` from ``t[0]`` to ``t[1]`` with torchdiffeq.

    Args:
        field: a module called as ``field(t, x)`` returning ``dx/dt`` of x's shape.
        t: the integration interval ``(t0, t1)``.
        method, rtol, atol, options: passed to ``torchdiffeq.odeint``.
        adjoint: use ``odeint_adjoint`` (O(1) memory, gradients by solving the adjoint ODE).

    Attributes:
        field: the vector field module.
        nfe: number of field evaluations in the last forward solve (the adjoint backward's
            evaluations are not counted).

    Shapes: ``forward(x)``: ``x (..., d)`` float -> ``x(t1) (..., d)``, same dtype and device.
    """

    def __init__(
        self,
        field: nn.Module,
        t: Sequence[float] = (0.0, 1.0),
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(field, nn.Module):
            raise TypeError(f"field must be an nn.Module called as field(t, x), got {type(field).__name__}")
        check_solver(method, rtol, atol)
        self.field = field
        self.t_span = _check_span(t)
        self.method = method
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.adjoint = bool(adjoint)
        self.options = dict(options) if options else None
        self.nfe = 0
        self._count = 0

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this block (``sparseode.save``): JSON values, and
        ``field`` as the field module."""
        return {"field": self.field, "t": list(self.t_span), "method": self.method, "rtol": self.rtol,
                "atol": self.atol, "adjoint": self.adjoint, "options": self.options}

    def _dynamics(self, t: Tensor, x: Tensor) -> Tensor:
        self._count += 1
        return self.field(t, x)

    def trajectory(self, x: Tensor, ts: Tensor | Sequence[float]) -> Tensor:
        """Solve from ``ts[0]`` and return the states at every time in ``ts``.

        Shapes: ``x (..., d)``, ``ts (T,)`` strictly monotone -> ``(T, ..., d)``.
        """
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
        ts = torch.as_tensor(ts, dtype=x.dtype, device=x.device)
        if ts.dim() != 1 or ts.numel() < 2:
            raise ValueError(f"ts must be a 1-D tensor with at least 2 times, got shape {tuple(ts.shape)}")
        self._count = 0
        out = solve(self._dynamics, x, ts, self.field, method=self.method, rtol=self.rtol, atol=self.atol,
                    options=self.options, adjoint=self.adjoint)
        self.nfe = self._count
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.trajectory(x, self.t_span)[-1]

    def extra_repr(self) -> str:
        return (f"t={self.t_span}, method={self.method!r}, rtol={self.rtol:g}, atol={self.atol:g}, "
                f"adjoint={self.adjoint}")


class ODEClassifier(nn.Module):
    """Classifier: optional linear embedding (or zero augmentation), ODE solve, linear read-out.

    ``logits = readout(ODE(pad(embed(x))))``. Train with cross-entropy on the logits.

    Args:
        in_dim: number of input features.
        hidden: hidden widths of the :class:`MLPVectorField`.
        n_classes: number of classes.
        time, activation: passed to :class:`MLPVectorField`.
        embed_dim: if given, a ``nn.Linear(in_dim, embed_dim)`` maps inputs to the ODE state.
        augment: zero channels appended to the state (augmented neural ODE, Dupont et al. 2019);
            a 2-D flow cannot untangle nested classes (``concentric``) without them.
        t, method, rtol, atol, adjoint, options: passed to :class:`NeuralODE`.

    Attributes: ``embed`` (Linear or None), ``ode`` (:class:`NeuralODE`), ``field``
    (``ode.field``), ``readout`` (Linear), ``state_dim``, ``nfe``.

    Shapes: ``forward(x)``: ``x (n, in_dim)`` float -> logits ``(n, n_classes)``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int | Sequence[int],
        n_classes: int,
        *,
        time: str | None = None,
        activation: str = "tanh",
        embed_dim: int | None = None,
        augment: int = 0,
        t: Sequence[float] = (0.0, 1.0),
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("in_dim", in_dim, 1), ("n_classes", n_classes, 2), ("augment", augment, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim < 1):
            raise ValueError(f"embed_dim must be a positive int or None, got {embed_dim!r}")
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.augment = augment
        self.embed = nn.Linear(in_dim, embed_dim) if embed_dim is not None else None
        self.state_dim = (embed_dim if embed_dim is not None else in_dim) + augment
        field = MLPVectorField(self.state_dim, hidden, time=time, activation=activation)
        self.ode = NeuralODE(field, t=t, method=method, rtol=rtol, atol=atol, adjoint=adjoint, options=options)
        self.readout = nn.Linear(self.state_dim, n_classes)
        self._config = {"in_dim": in_dim, "hidden": list(field.hidden), "n_classes": n_classes, "time": time,
                        "activation": activation, "embed_dim": embed_dim, "augment": augment,
                        "t": list(self.ode.t_span), "method": method, "rtol": rtol, "atol": atol,
                        "adjoint": adjoint, "options": self.ode.options}

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON values) that rebuild this classifier (``sparseode.save``)."""
        return dict(self._config)

    @property
    def field(self) -> nn.Module:
        """The vector field (``self.ode.field``)."""
        return self.ode.field

    @property
    def nfe(self) -> int:
        """Field evaluations of the last forward solve."""
        return self.ode.nfe

    def features(self, x: Tensor) -> Tensor:
        """The ODE's final state ``(n, state_dim)`` for inputs ``x (n, in_dim)``."""
        if x.dim() != 2 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have shape (n, {self.in_dim}), got {tuple(x.shape)}")
        h = self.embed(x) if self.embed is not None else x
        if self.augment:
            h = torch.cat([h, h.new_zeros(*h.shape[:-1], self.augment)], dim=-1)
        return self.ode(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted class indices ``(n,)`` int64."""
        return self.forward(x).argmax(dim=-1)
