"""Masks stay applied through sparseode.train.fit (AdamW with weight decay and momentum)."""
from __future__ import annotations

import torch
import torch.nn as nn

import sparseode as so
from sparseode.train import fit


def _check_masks(model):
    ok = []

    def cb(state):
        for name, m in state.model.named_modules():
            if isinstance(m, nn.Linear) and hasattr(m, "weight_mask"):
                pruned = m.weight_mask == 0
                ok.append(bool((m.weight_orig.grad[pruned] == 0).all()))
                ok.append(bool(((m.weight_orig * m.weight_mask)[pruned] == 0).all()))
        return None

    return cb, ok


def test_fit_keeps_masks_mlp():
    torch.manual_seed(0)
    X, Y = torch.randn(64, 3), torch.randn(64, 2)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    so.prune.apply(model, "random", 0.7)
    masks = {k: v.clone() for k, v in so.prune.masks(model).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb, ok = _check_masks(model)
    res = fit(model, (X, Y), loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), epochs=5,
              lr=0.05, weight_decay=0.5, batch_size=16, callbacks=[cb], progress=False)
    assert res.steps == 20 and ok and all(ok)
    for k, v in so.prune.masks(model).items():
        assert torch.equal(v, masks[k])
    model(X)  # the pre-hook refreshes .weight
    for m in (model[0], model[2]):
        assert (m.weight[m.weight_mask == 0] == 0).all()
    # training did move the unpruned weights (the test is not vacuous)
    assert not torch.equal(before["0.weight_orig"], model[0].weight_orig)
    assert so.prune.sparsity(model).total == round(0.7 * 80) / 80


def test_fit_keeps_masks_through_ode_solve():
    torch.manual_seed(0)
    X, y = so.data.classification("concentric", 64, seed=0)
    clf = so.models.ODEClassifier(2, (8,), 2, augment=1, method="rk4", options={"step_size": 0.5})
    so.prune.apply(clf, "magnitude", 0.5, filter_fn=lambda n, m: n.startswith("ode.field"))
    cb, ok = _check_masks(clf)
    fit(clf, (X, y), epochs=2, lr=0.05, weight_decay=0.1, batch_size=32, callbacks=[cb], progress=False)
    assert ok and all(ok)
    rep = so.prune.sparsity(clf, filter_fn=lambda n, m: n.startswith("ode.field"))
    assert rep.total == round(0.5 * rep.numel) / rep.numel
