"""One call into torchdiffeq for every model (:class:`NeuralODE`, :class:`CNF`), with the empty batch
answered without the solver."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

__all__ = ["solve"]

State = Any  # a tensor or a tuple of tensors, as torchdiffeq takes them


def _constant(state: State, rates: State, steps: int) -> State:
    # ``s + 0 * r`` is as empty as s; it keeps the result in the graph of the field's parameters
    if isinstance(state, tuple):
        return tuple(_constant(s, r, steps) for s, r in zip(state, rates))
    return (state + 0 * rates).unsqueeze(0).repeat(steps, *[1] * state.dim())


def solve(func: Callable[[Tensor, State], State], state: State, ts: Tensor, field: nn.Module, *,
          method: str, rtol: float, atol: float, options: dict[str, Any] | None, adjoint: bool) -> State:
    """Solve ``d state/dt = func(t, state)`` and return the states at every time of ``ts``.

    Shapes: ``state`` a tensor ``(..., d)`` or a tuple of tensors, ``ts (T,)`` -> each with a
    leading time axis ``(T, ...)``. ``adjoint`` uses ``odeint_adjoint`` over ``field``'s trainable
    parameters.

    A state with no entries (a batch of 0 points) is the same at every time and is returned without
    the solver, whose error norm over no entries ends adaptive methods with "underflow in dt". It
    still goes through one evaluation of ``func`` so that, as for ``nn.Linear`` on an empty batch,
    a backward pass reaches the field's parameters (with zero gradients).
    """
    tensors = state if isinstance(state, tuple) else (state,)
    if all(s.numel() == 0 for s in tensors):
        return _constant(state, func(ts[0], state), ts.numel())
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options)
    if adjoint:
        params = tuple(p for p in field.parameters() if p.requires_grad)
        return odeint_adjoint(func, state, ts, adjoint_params=params, **kwargs)
    return odeint(func, state, ts, **kwargs)
