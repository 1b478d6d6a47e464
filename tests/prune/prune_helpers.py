"""Tiny models and independent (flat-vector) derivative computations for the pruning tests."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call
from torchdiffeq import odeint, odeint_adjoint


def mlp(sizes=(3, 4, 4, 2), act=nn.Tanh, dtype=torch.float64) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


class Field(nn.Module):
    """f(t, z) = W2 tanh(W1 [z, t] + b1) + b2 (my own field, not sparseode.models)."""

    def __init__(self, dim=2, hidden=4):
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t, z):
        tt = torch.ones_like(z[:, :1]) * t
        return self.l2(torch.tanh(self.l1(torch.cat([z, tt], 1))))


class ODEReg(nn.Module):
    """z(1) of dz/dt = f(t, z), z(0) = x; through odeint (or odeint_adjoint)."""

    def __init__(self, dim=2, hidden=4, method="rk4", adjoint=False):
        super().__init__()
        self.field = Field(dim, hidden)
        self.method, self.adjoint = method, adjoint

    def forward(self, x):
        t = torch.tensor([0.0, 1.0], dtype=x.dtype)
        opts = {"step_size": 0.25} if self.method == "rk4" else {}
        solve = odeint_adjoint if self.adjoint else odeint
        kw = {"adjoint_params": tuple(self.parameters())} if self.adjoint else {}
        return solve(self.field, x, t, method=self.method, options=opts, rtol=1e-7, atol=1e-7, **kw)[-1]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(n=3, bs=5, din=3, dout=2, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, din, generator=g, dtype=dtype), torch.randn(bs, dout, generator=g, dtype=dtype))
            for _ in range(n)]


def flat_loss(model, loss_fn, data):
    """(names, shapes, θ0 flat, L(θ flat)) with L the mean loss over ``data``, via functional_call."""
    named = [(n, p) for n, p in model.named_parameters()]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = v[i:i + k].reshape(s)
            i += k
        return out

    class _Proxy(nn.Module):
        pass

    def L(v):
        params = unflat(v)
        tot = 0
        for b in data:
            x, y = b
            out = functional_call(model, params, (x,))
            tot = tot + ((out - y) ** 2).mean()
        return tot / len(data)

    return names, shapes, theta0, L, unflat


# ----------------------------------------------------------------------------------------------
# A minimal fit following sparseode.train.fit's callback contract (FitState after every step)
# ----------------------------------------------------------------------------------------------
from dataclasses import dataclass, field as _field


@dataclass
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    step: int
    loss: float
    val_metric: float | None = None
    history: list = _field(default_factory=list)


@dataclass
class Result:
    history: list
    epochs_run: int
    steps: int
    stopped_early: bool
    best_val: float | None = None


def loop_fit(model, data, loss_fn=mse, epochs=3, lr=1e-2, weight_decay=0.0, callbacks=()):
    """AdamW over ``data`` (a list of batches) for ``epochs``; callbacks after every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)
    step = 0
    for epoch in range(epochs):
        for b in data:
            opt.zero_grad()
            loss = loss_fn(model, b)
            loss.backward()
            opt.step()
            step += 1
            st = State(model, opt, epoch, step, float(loss.detach()))
            if any(bool(cb(st)) for cb in callbacks):
                return Result([], epoch + 1, step, True)
    return Result([], epochs, step, False)
