"""ICP: the discrepancy measure against independent computations, and the stopping rule."""
from __future__ import annotations

import pytest
import torch

import sparseode as so
from prune_helpers import batches, loop_fit, mlp, mse


def _layer_io(model, probe):
    """Independent: each Linear's output on the probe, by a manual forward; and ‖∂L/∂W‖."""
    lins = [model[0], model[2], model[4]]
    outs = [[], [], []]
    for x, _ in probe:
        h = x
        for i, m in enumerate(lins):
            w = m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
            h = h @ w.T + m.bias
            outs[i].append(h.detach())
            if i < 2:
                h = torch.tanh(h)
    leaves = [m.weight_orig if hasattr(m, "weight_orig") else m.weight for m in lins]
    loss = sum(mse(model, b) for b in probe) / len(probe)
    gs = torch.autograd.grad(loss, leaves)
    return [torch.cat(o) for o in outs], [float(g.norm()) for g in gs]


def test_discrepancy_values_match_independent_computation():
    model = mlp((3, 6, 6, 2))
    probe = batches(2, bs=7)
    icp = so.prune.ICP("discrepancy", probe=probe, loss_fn=mse, tol_info=0.05, tol_grad=0.2)
    icp.reference(model)
    a_ref, g_ref = _layer_io(model, probe)
    so.prune.apply(model, "magnitude", 0.5)
    ok, vals = icp.check(model)
    a, g = _layer_io(model, probe)
    for i, n in enumerate(["0", "2", "4"]):
        d = float((a[i] - a_ref[i]).norm() / a_ref[i].norm())
        assert vals["info"][n] == pytest.approx(d, rel=1e-10)
        assert vals["grad"][n] == pytest.approx(g[i] / g_ref[i], rel=1e-10)
    expected = max(vals["info"].values()) < 0.05 and all(abs(r - 1) <= 0.2 for r in vals["grad"].values())
    assert ok == expected
    assert max(vals["info"].values()) > 0  # pruning changed something


def test_unchanged_network_is_consistent_and_measures_are_a_registry():
    model = mlp((3, 6, 2))
    icp = so.prune.ICP("discrepancy", probe=batches(1), loss_fn=mse)
    icp.reference(model)
    ok, vals = icp.check(model)
    assert ok and vals["max_info"] == 0 and vals["max_grad_dev"] == 0
    assert "discrepancy" in so.prune.ICP_MEASURES
    with pytest.raises(ValueError, match="measure"):
        so.prune.ICP("connectivity-typo", probe=batches(1))
    with pytest.raises(ValueError, match="probe"):
        so.prune.ICP()
    for arg in ("patience", "check_every"):
        with pytest.raises(ValueError, match=arg):
            so.prune.ICP(probe=batches(1), **{arg: 0})
    with pytest.raises(ValueError, match="tol_info"):
        so.prune.ICP("discrepancy", probe=batches(1), tol_info=0)


class Scripted:
    """A test measure: consistency follows a script, one entry per check."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.i = list(script), 0

    def snapshot(self, model, probe, loss_fn):
        return None

    def compare(self, ref, cur):
        ok = self.script[min(self.i, len(self.script) - 1)]
        self.i += 1
        return ok, {"i": self.i}


class _S:
    def __init__(self, model, step, epoch):
        self.model, self.step, self.epoch = model, step, epoch


def _drive(icp, n_steps, spe=100):
    icp.reference(None)
    icp.start()
    for s in range(1, n_steps + 1):
        if icp(_S(None, s, (s - 1) // spe)):
            break
    return icp.finish()


def test_rule_patience_check_every_min_steps():
    # checks at steps 5,10,15,...: consistent from the 3rd check on; patience 2 -> stop at 20
    icp = so.prune.ICP(Scripted([False, False, True, True, True]), probe=[(torch.zeros(1),)], loss_fn=mse,
                       patience=2, check_every=5, min_steps=0)
    rec = _drive(icp, 100)
    assert rec == {"steps": 20, "reason": "consistent", "checks": rec["checks"]}
    assert [c["step"] for c in rec["checks"]] == [5, 10, 15, 20]
    # a broken streak restarts patience
    icp = so.prune.ICP(Scripted([True, False, True, True]), probe=[(torch.zeros(1),)], loss_fn=mse,
                       patience=2, check_every=5, min_steps=0)
    assert _drive(icp, 100)["steps"] == 20
    # never before min_steps
    icp = so.prune.ICP(Scripted([True]), probe=[(torch.zeros(1),)], loss_fn=mse, patience=1, check_every=5, min_steps=23)
    assert _drive(icp, 100)["steps"] == 25
    # never consistent: runs to the fit's end
    icp = so.prune.ICP(Scripted([False]), probe=[(torch.zeros(1),)], loss_fn=mse, check_every=5)
    rec = _drive(icp, 42)
    assert rec["steps"] == 42 and rec["reason"] == "budget"


def test_rule_max_epochs():
    icp = so.prune.ICP(Scripted([False]), probe=[(torch.zeros(1),)], loss_fn=mse, check_every=5, max_epochs=2)
    rec = _drive(icp, 1000, spe=30)
    assert rec["reason"] == "max_epochs" and rec["steps"] == 60
    icp = so.prune.ICP(Scripted([False]), probe=[(torch.zeros(1),)], loss_fn=mse, check_every=5, max_epochs=1.5,
                       steps_per_epoch=30)
    assert _drive(icp, 1000, spe=30)["steps"] == 45


def test_icp_stops_real_retraining_early():
    torch.manual_seed(0)
    data = batches(8, bs=16)
    model = mlp((3, 16, 16, 2))
    loop_fit(model, data, epochs=40, lr=1e-2)
    icp = so.prune.ICP("discrepancy", probe=batches(2, bs=32, seed=5), loss_fn=mse, tol_info=0.2, tol_grad=0.5,
                       patience=2, check_every=4, min_steps=8)
    icp.reference(model)
    so.prune.apply(model, "magnitude", 0.3)
    icp.start()
    res = loop_fit(model, data, epochs=20, lr=1e-3, callbacks=[icp])
    rec = icp.finish()
    assert rec["reason"] == "consistent" and res.stopped_early
    assert rec["steps"] < 20 * len(data)
    last = rec["checks"][-1]
    assert last["consistent"] and last["max_info"] < 0.2 and last["max_grad_dev"] <= 0.5


def test_ode_probe_is_a_fixed_step_solve():
    models = pytest.importorskip("sparseode.models")
    torch.manual_seed(0)
    f = models.MLPVectorField(2, (8,), time="concat", activation="tanh")
    node = models.NeuralODE(f, method="dopri5", rtol=1e-6, atol=1e-6)
    x = torch.randn(10, 2)
    probe = [(x, torch.randn(10, 2))]
    lf = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    meas = so.prune.DiscrepancyMeasure(n_steps=3)
    snap = meas.snapshot(node, probe, lf)
    assert node.method == "dopri5" and node.options is None  # restored
    # rk4 with 3 steps: 12 field evaluations of 10 samples each
    assert snap.activations["field.layers.0.linear"].shape == (120, 8)
    # independent: the same fixed-step solve by hand
    from torchdiffeq import odeint

    rec = []
    h = f.layers[0].linear.register_forward_hook(lambda m, i, o: rec.append(o.detach()))
    odeint(f, x, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 1 / 3})
    h.remove()
    torch.testing.assert_close(snap.activations["field.layers.0.linear"], torch.cat(rec))
