"""iterative's warm restarts of the learning rate and min_density/keep_dense passed to apply."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import sparseode as so
from sparseode.train import fit
from prune_helpers import mlp, mse


def regression(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return X, torch.tanh(X[:, :2] * 2)


def retrain(**kw):
    X, y = regression()
    return functools.partial(fit, data=(X, y), loss_fn=mse, epochs=4, lr=0.02, batch_size=16,
                             milestones=(1, 3), gamma=0.5, progress=False, **kw)


def test_warm_restarts_start_every_round_at_the_initial_lr():
    lrs = []

    def spy(m, callbacks=(), **kw):  # the LR of every round's first optimiser step, seen by a callback
        first = []
        cb = lambda s: first.append(s.optimizer.param_groups[0]["lr"]) or False  # noqa: E731
        res = retrain()(m, callbacks=[*callbacks, cb], **kw)
        lrs.append((first[0], first[-1]))
        return res

    hist = so.prune.iterative(mlp((3, 16, 16, 2)), spy, target=0.8, rounds=4, progress=False)
    assert [a for a, _ in lrs] == [0.02] * 4
    assert all(b == pytest.approx(0.02 * 0.25) for _, b in lrs)  # decayed twice within each round
    assert [r.lr_start for r in hist.rounds] == [0.02] * 4
    assert [r.lr_end for r in hist.rounds] == pytest.approx([0.005] * 4)


def test_without_warm_restarts_each_round_continues_at_the_last_lr():
    hist = so.prune.iterative(mlp((3, 16, 16, 2)), retrain(), target=0.8, rounds=3, warm_restarts=False,
                              progress=False)
    assert hist.rounds[0].lr_start == 0.02 and hist.rounds[0].lr_end == pytest.approx(0.005)
    for prev, r in zip(hist.rounds, hist.rounds[1:]):
        assert r.lr_start == pytest.approx(prev.lr_end) and r.lr_end == pytest.approx(r.lr_start)


def test_a_fit_that_does_not_restart_is_reported():
    model = mlp((3, 16, 16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # one optimiser for the whole cascade (wrong)

    def persistent(m, callbacks=()):
        for g in opt.param_groups:
            g["lr"] *= 0.5
        for cb in callbacks:
            cb(type("S", (), {"optimizer": opt, "model": m, "step": 1, "epoch": 0})())

    with pytest.warns(UserWarning, match=r"round 1 started at lr 0.025, the first round at 0.05"):
        so.prune.iterative(model, persistent, target=0.8, rounds=3, progress=False)


def test_warm_restarts_bad_values():
    with pytest.raises(TypeError, match="warm_restarts must be True or False"):
        so.prune.iterative(mlp(), retrain(), rounds=2, warm_restarts="yes", progress=False)
    with pytest.raises(TypeError, match="warm_restarts=False passes lr= and milestones="):
        so.prune.iterative(mlp(), lambda m, callbacks=(): None, rounds=2, warm_restarts=False, progress=False)


def test_lr_unknown_for_a_fit_without_callbacks_is_none_in_json():
    hist = so.prune.iterative(mlp(), lambda m, callbacks=(): None, schedule=[0.5], progress=False)
    assert math.isnan(hist.rounds[0].lr_start)
    assert hist.to_dicts()[0]["lr_start"] is None and hist.to_dicts()[0]["lr_end"] is None


def _densities(model):
    return {n: float(m.weight_mask.float().mean()) for n, m in so.prune.prunable_layers(model).items()
            if hasattr(m, "weight_mask")}


@pytest.mark.parametrize("floor", [0.08, {"0": 0.3, "4": 0.3}])
def test_min_density_keeps_every_layer_at_or_above_it_every_round(floor):
    floors = {n: (floor if isinstance(floor, float) else floor.get(n, 0.0)) for n in ("0", "2", "4")}
    model = mlp((3, 32, 32, 2))
    per_round = []

    def fit_fn(m, callbacks=()):
        per_round.append(_densities(m))

    hist = so.prune.iterative(model, fit_fn, target=0.9, rounds=4, min_density=floor, progress=False)
    plain = mlp((3, 32, 32, 2))
    so.prune.iterative(plain, lambda m, callbacks=(): None, target=0.9, rounds=4, progress=False)
    assert any(d < floors[n] for n, d in _densities(plain).items())  # global magnitude alone goes below
    assert len(per_round) == 4
    for d in per_round:
        assert set(d) == {"0", "2", "4"}
        assert all(d[n] >= floors[n] - 1e-12 for n in d), d
    assert hist.rounds[-1].sparsity == pytest.approx(0.9, abs=0.005)


def test_keep_dense_and_bad_floors_fail_before_any_round():
    model = mlp((3, 32, 32, 2))
    calls = []
    so.prune.iterative(model, lambda m, callbacks=(): calls.append(1), target=0.8, rounds=2, keep_dense=["4"],
                       progress=False)
    assert not hasattr(model[4], "weight_mask") and hasattr(model[0], "weight_mask") and len(calls) == 2
    for kw, match in (({"min_density": 0.5}, "min_density"), ({"min_density": 1.5}, "min_density"),
                      ({"keep_dense": ["9"]}, "keep_dense"), ({"min_density": {"7": 0.1}}, "min_density")):
        calls.clear()
        with pytest.raises((ValueError, TypeError), match=match):
            so.prune.iterative(mlp((3, 32, 32, 2)), lambda m, callbacks=(): calls.append(1), target=0.9,
                               rounds=3, progress=False, **kw)
        assert calls == []
