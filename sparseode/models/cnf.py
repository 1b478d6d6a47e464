"""Continuous normalizing flows (FFJORD): exact or Hutchinson trace, stacked flows.

Convention (as in FFJORD): data ``x`` at ``t=0`` is integrated to ``z`` at ``t=T`` together with
``d(delta)/dt = -tr(df/dx)``; then ``log p(x) = log N(z; 0, I) - delta = log N(z; 0, I) + ∫ tr dt``.
``sample`` integrates ``z ~ N(0, I)`` backwards from ``T`` to ``0``. A stacked CNF chains its
flows: ``x -> flow_1 -> ... -> flow_K -> z``.

The trace computation is a registry, :data:`TRACES`, from name to a function
``fn(field, t, x, noise) -> (dx/dt, -trace)`` (``dx (..., d)``, ``-trace (...,)``). A new entry
(e.g. a fused forward-mode path) is one more item. The functions run in grad mode internally and
keep a differentiable graph only when grad mode was on when they were called.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .forward_mode import exact_trace_forward, hutchinson_trace_forward, supports_forward_mode
from .node import check_solver
from .solve import solve

__all__ = ["CNF", "TRACES", "FORWARD_TRACES", "NOISES", "STOCHASTIC_TRACES", "exact_trace", "hutchinson_trace",
           "standard_normal_logprob"]

TraceFn = Callable[[nn.Module, Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor]"]


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over the last dimension: ``(..., d) -> (...,)``."""
    d = z.shape[-1]
    return -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi)


def _field_with_input(field: nn.Module, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    return x, field(t, x)


def _grad(out: Tensor, x: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    if not out.requires_grad:  # the field does not depend on x (or on anything differentiable)
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(out, x, v, create_graph=create_graph, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def exact_trace(field: nn.Module, t: Tensor, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(f(t, x), -tr(df/dx))`` with the trace from d vector-Jacobian products (exact, any d).

    Shapes: ``x (..., d)`` -> ``(dx (..., d), -trace (...,))``. ``noise`` is ignored.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x, dx = _field_with_input(field, t, x)
        trace = x.new_zeros(x.shape[:-1])
        for i in range(x.shape[-1]):
            onehot = torch.zeros_like(dx)
            onehot[..., i] = 1.0
            trace = trace + _grad(dx, x, onehot, create_graph)[..., i]
    if not create_graph:
        return dx.detach(), -trace.detach()
    return dx, -trace


def hutchinson_trace(field: nn.Module, t: Tensor, x: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(f(t, x), -eᵀ(df/dx)e)``: Hutchinson's unbiased estimate with probe ``e = noise``.

    Shapes: ``x (..., d)``, ``noise`` of x's shape -> ``(dx (..., d), -estimate (...,))``.
    """
    if noise is None or noise.shape != x.shape:
        raise ValueError(f"hutchinson_trace needs noise of x's shape {tuple(x.shape)}, "
                         f"got {None if noise is None else tuple(noise.shape)}")
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x, dx = _field_with_input(field, t, x)
        e_jac = _grad(dx, x, noise, create_graph)
        estimate = (e_jac * noise).sum(-1)
    if not create_graph:
        return dx.detach(), -estimate.detach()
    return dx, -estimate


def _rademacher(x: Tensor) -> Tensor:
    return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype).mul_(2).sub_(1)


#: Trace computations by name: ``fn(field, t, x, noise) -> (dx/dt, -trace)``.
TRACES: dict[str, TraceFn] = {"exact": exact_trace, "hutchinson": hutchinson_trace}
#: The same traces by forward mode (``sparseode.models.forward_mode``): the CNF's inference
#: dynamics, used when grad mode is off and the field is an MLP field; same probes, same values.
FORWARD_TRACES: dict[str, TraceFn] = {"exact": exact_trace_forward, "hutchinson": hutchinson_trace_forward}
#: How a CNF computes the trace when no gradient is needed.
INFERENCE_TRACES: tuple[str, ...] = ("forward", "autograd")
#: Traces that need a probe drawn per solve (kept as ``CNF._noise``).
STOCHASTIC_TRACES: set[str] = {"hutchinson"}
#: Probe distributions by name: ``fn(x) -> probe of x's shape and dtype`` (zero mean, identity covariance).
NOISES: dict[str, Callable[[Tensor], Tensor]] = {"gaussian": torch.randn_like, "rademacher": _rademacher}


class CNF(nn.Module):
    """A continuous normalizing flow with a standard normal base, or a stack of them.

    Args:
        field: a vector field module ``field(t, x)`` or a sequence of them (stacked flows,
            applied in order from data to latent).
        trace: a name in :data:`TRACES` (``"exact"`` or ``"hutchinson"``).
        noise: the Hutchinson probe, a name in :data:`NOISES` (``"gaussian"``/``"rademacher"``).
        T: integration time of each flow.
        method, rtol, atol, options: passed to torchdiffeq.
        adjoint: use ``odeint_adjoint`` for gradients.
        inference_trace: with grad mode off, ``"forward"`` (default) pushes the tangents through
            the field with its forward pass (:data:`FORWARD_TRACES`, MLP fields only; others fall
            back to autograd); ``"autograd"`` always uses the vector-Jacobian products.

    Attributes:
        fields: ``nn.ModuleList`` of the flows' fields; ``field`` is the only one of a single flow.
        nfe: field evaluations (summed over stacked flows) in the last ``log_prob``/``sample``.
        _noise: the probe of the current/last solve (drawn once per solve, as FFJORD does).

    Shapes: ``log_prob(x)``: ``x (..., d)`` -> ``(...,)`` in nats, dtype of x.
    ``sample(n)`` -> ``(n, d)`` in the parameters' dtype and device.
    """

    def __init__(
        self,
        field: nn.Module | Sequence[nn.Module],
        trace: str = "exact",
        noise: str = "gaussian",
        T: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool = False,
        options: dict[str, Any] | None = None,
        inference_trace: str = "forward",
    ) -> None:
        super().__init__()
        fields = list(field) if not isinstance(field, nn.Module) or isinstance(field, nn.ModuleList) else [field]
        if not fields or not all(isinstance(f, nn.Module) for f in fields):
            raise TypeError("field must be an nn.Module or a non-empty sequence of nn.Modules")
        if trace not in TRACES:
            raise ValueError(f"trace must be one of {sorted(TRACES)}, got {trace!r}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {sorted(NOISES)}, got {noise!r}")
        if not (isinstance(T, (int, float)) and T > 0):
            raise ValueError(f"T must be a positive number, got {T!r}")
        if inference_trace not in INFERENCE_TRACES:
            raise ValueError(f"inference_trace must be one of {INFERENCE_TRACES}, got {inference_trace!r}")
        check_solver(method, rtol, atol)
        dims = {getattr(f, "dim", None) for f in fields} - {None}
        if len(dims) > 1:
            raise ValueError(f"stacked fields must share one dimension, got dims {sorted(dims)}")
        self.fields = nn.ModuleList(fields)
        self.dim: int | None = dims.pop() if dims else None
        self.trace = trace
        self.noise = noise
        self.T = float(T)
        self.method = method
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.adjoint = bool(adjoint)
        self.options = dict(options) if options else None
        self.inference_trace = inference_trace
        self.nfe = 0
        self._count = 0
        self._noise: Tensor | None = None

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this CNF (``sparseode.save``): JSON values, and
        ``field`` as the field module (a list of them for a stack)."""
        fields = list(self.fields)
        return {"field": fields[0] if len(fields) == 1 else fields, "trace": self.trace, "noise": self.noise,
                "T": self.T, "method": self.method, "rtol": self.rtol, "atol": self.atol, "adjoint": self.adjoint,
                "options": self.options, "inference_trace": self.inference_trace}

    @property
    def field(self) -> nn.Module:
        """The field of a single flow (use ``fields`` for a stack)."""
        if len(self.fields) != 1:
            raise AttributeError(f"this CNF stacks {len(self.fields)} flows; use .fields")
        return self.fields[0]

    # -- solving -------------------------------------------------------------------------------
    def _odeint(self, func: Callable, state: Any, ts: Tensor, field: nn.Module) -> Any:
        return solve(func, state, ts, field, method=self.method, rtol=self.rtol, atol=self.atol,
                     options=self.options, adjoint=self.adjoint)

    def _flow_with_trace(self, field: nn.Module, x: Tensor, t0: float, t1: float) -> tuple[Tensor, Tensor]:
        """Integrate ``(x, 0)`` from t0 to t1; return ``(x(t1), ∫_{t0}^{t1} -tr dt)``."""
        trace_fn = TRACES[self.trace]
        # a field with a fused op (sparseode.nn.fused_field) runs the forward-mode trace in one call per
        # evaluation with its own backward: training is a forward solve plus one reverse pass
        fused = getattr(field, "fused_trace", None)
        fused = fused(self.trace, x) if fused is not None else None
        if fused is not None and (torch.is_grad_enabled() or self.inference_trace == "forward"):
            trace_fn = fused
        elif self.inference_trace == "forward" and not torch.is_grad_enabled() and supports_forward_mode(field):
            trace_fn = FORWARD_TRACES[self.trace]
        # one probe per solve, kept on the object; the closure holds its own reference so an
        # adjoint backward pass reuses this solve's probe even after later solves replaced _noise
        noise = NOISES[self.noise](x) if self.trace in STOCHASTIC_TRACES else None
        self._noise = noise

        def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            self._count += 1
            return trace_fn(field, t, state[0], noise)

        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        xs, deltas = self._odeint(dynamics, (x, x.new_zeros(x.shape[:-1])), ts, field)
        return xs[-1], deltas[-1]

    def _flow(self, field: nn.Module, x: Tensor, t0: float, t1: float) -> Tensor:
        def dynamics(t: Tensor, state: Tensor) -> Tensor:
            self._count += 1
            return field(t, state)

        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        return self._odeint(dynamics, x, ts, field)[-1]

    def _check_x(self, x: Tensor, name: str = "x") -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__}")
        if x.dim() < 1 or (self.dim is not None and x.shape[-1] != self.dim):
            raise ValueError(f"{name} must have shape (..., {self.dim}), got {tuple(x.shape)}")

    # -- public --------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to latent: ``x (..., d) -> (z (..., d), ∫ tr dt (...,))`` through all flows."""
        self._check_x(x)
        self._count = 0
        z, logdet = x, x.new_zeros(x.shape[:-1])
        for field in self.fields:
            z, delta = self._flow_with_trace(field, z, 0.0, self.T)
            logdet = logdet - delta
        self.nfe = self._count
        return z, logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats: ``x (..., d)`` float -> ``(...,)``."""
        z, logdet = self.encode(x)
        return standard_normal_logprob(z) + logdet

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x)

    def decode(self, z: Tensor) -> Tensor:
        """Map latent to data (no trace): ``z (..., d) -> x (..., d)``, flows in reverse order."""
        self._check_x(z, "z")
        self._count = 0
        x = z
        for field in reversed(self.fields):
            x = self._flow(field, x, self.T, 0.0)
        self.nfe = self._count
        return x

    def _param_like(self) -> tuple[torch.dtype, torch.device]:
        p = next(self.parameters(), None)
        return (p.dtype, p.device) if p is not None else (torch.get_default_dtype(), torch.device("cpu"))

    def sample(
        self,
        n: int,
        *,
        z: Tensor | None = None,
        return_log_prob: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` samples ``(n, d)``: ``z ~ N(0, I)`` integrated from ``T`` back to ``0``.

        Args:
            n: number of samples (ignored when ``z`` is given).
            z: latent points ``(n, d)`` to decode instead of drawing them.
            return_log_prob: also return ``log p(x) (n,)`` of the samples, computed with the
                trace along the same backward solve.
            generator: a ``torch.Generator`` for the base draw.
        """
        if z is None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"n must be a non-negative int, got {n!r}")
            if self.dim is None:
                raise ValueError("the fields have no .dim; pass z=(n, d) to sample")
            dtype, device = self._param_like()
            z = torch.randn(n, self.dim, dtype=dtype, device=device, generator=generator)
        if not return_log_prob:
            return self.decode(z)
        self._check_x(z, "z")
        self._count = 0
        x, acc = z, z.new_zeros(z.shape[:-1])
        logpz = standard_normal_logprob(z)
        for field in reversed(self.fields):
            # from T to 0: delta(0) - delta(T) = ∫_T^0 -tr dt = ∫_0^T tr dt
            x, delta = self._flow_with_trace(field, x, self.T, 0.0)
            acc = acc + delta
        self.nfe = self._count
        return x, logpz + acc

    def extra_repr(self) -> str:
        return (f"flows={len(self.fields)}, trace={self.trace!r}, noise={self.noise!r}, T={self.T:g}, "
                f"method={self.method!r}, rtol={self.rtol:g}, atol={self.atol:g}, adjoint={self.adjoint}")
