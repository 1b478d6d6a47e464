"""Rewinding wrapper for prune-retrain cascades."""
from __future__ import annotations

import pytest
import torch

import sparseode as so
from sparseode.prune.rewind import rewind_to, rewinding, snapshot_weights
from prune_helpers import batches, loop_fit, mlp


def _recording_fit(data, starts):
    def fit(m, callbacks=()):
        starts.append({n: t.detach().clone() for n, t in m.state_dict().items()})
        return loop_fit(m, data, epochs=1, lr=1e-2, callbacks=callbacks)
    return fit


def test_rewind_to_init_keeps_masks_and_resets_survivors():
    torch.manual_seed(0)
    model = mlp((3, 8, 2))
    w0 = [model[0].weight.detach().clone(), model[0].bias.detach().clone(), model[2].weight.detach().clone()]
    starts: list[dict] = []
    fit = rewinding(_recording_fit(batches(4), starts), model, "init")
    so.prune.iterative(model, fit, target=0.75, rounds=3, progress=False)
    assert len(starts) == 3
    for s in starts:  # every round starts from the initial values (weight_orig zero where pruned)
        torch.testing.assert_close(s["0.weight_orig"], w0[0] * s["0.weight_mask"], rtol=0, atol=0)
        torch.testing.assert_close(s["0.bias"], w0[1], rtol=0, atol=0)
        torch.testing.assert_close(s["2.weight_orig"], w0[2] * s["2.weight_mask"], rtol=0, atol=0)
    assert so.prune.sparsity(model).total == pytest.approx(0.75, abs=0.02)
    # the effective weights are m ⊙ θ_init + training: pruned entries are zero
    assert (model[0].weight[model[0].weight_mask == 0] == 0).all()


def test_late_rewinding_to_round_k():
    torch.manual_seed(0)
    model = mlp((3, 8, 2))
    starts: list[dict] = []
    after: list[dict] = []
    inner = _recording_fit(batches(4), starts)

    def fit(m, callbacks=()):
        r = inner(m, callbacks)
        after.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return r

    so.prune.iterative(model, rewinding(fit, model, 0), target=0.75, rounds=4, progress=False)
    assert len(starts) == 4
    assert not torch.equal(starts[1]["0.bias"], starts[0]["0.bias"])  # round 1 continues from round 0
    for s in starts[1:]:  # rounds 1.. start from round 0's retrained weights
        torch.testing.assert_close(s["0.bias"], after[0]["0.bias"], rtol=0, atol=0)
        torch.testing.assert_close(s["2.weight_orig"], after[0]["2.weight_orig"] * s["2.weight_mask"], rtol=0, atol=0)


def test_rewind_bad_input():
    model = mlp()
    f = lambda m, callbacks=(): None  # noqa: E731
    assert rewinding(f, model, None) is f
    for bad in ("start", -1, True, 1.5):
        with pytest.raises(ValueError, match="rewind"):
            rewinding(f, model, bad)
    snap = snapshot_weights(model)
    snap.pop("0.bias")
    with pytest.raises(KeyError, match="0.bias"):
        rewind_to(model, snap)
