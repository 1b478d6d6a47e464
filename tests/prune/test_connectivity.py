"""ICP as published: connectivity, gradient flow and the "connectivity" measure, against direct computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import sparseode as so
from sparseode.prune.connectivity import ConnectivityMeasure, connectivity, gradient_flow
from prune_helpers import batches, loop_fit, mlp, mse


def _direct_outputs(model, probe):
    """Each Linear's pre-activation output over the probe, by a manual forward: list of (N, n_l)."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    outs = [[] for _ in lins]
    for b in probe:
        h = b[0]
        for i, m in enumerate(lins):
            w = m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
            h = h @ w.T + m.bias
            outs[i].append(h.detach())
            if i < len(lins) - 1:
                h = torch.tanh(h)
    return [torch.cat(o) for o in outs]


def _direct_connectivity(outs):
    """c_l = mean(F_lᵀ F_{l+1} / N), F standardised per unit; a zero-variance unit → zero column."""
    fs = []
    for a in outs:
        a = a.double()
        centred = a - a.mean(0)
        sd = torch.sqrt((centred ** 2).mean(0))
        f = torch.where(sd > 0, centred / torch.where(sd > 0, sd, torch.ones_like(sd)), torch.zeros_like(a))
        fs.append(f)
    n = outs[0].shape[0]
    return torch.stack([(f0.T @ f1 / n).mean() for f0, f1 in zip(fs[:-1], fs[1:])])


def test_connectivity_matches_direct_computation_with_a_dead_unit():
    torch.manual_seed(0)
    model = mlp((3, 5, 4, 2))
    with torch.no_grad():
        model[0].weight[2].zero_()        # unit 2 of layer 0: constant output (its bias), zero variance
        model[2].weight[1].zero_()
    probe = batches(3, bs=7)
    c = connectivity(model, probe)
    outs = _direct_outputs(model, probe)
    assert outs[0][:, 2].std() == 0
    expected = _direct_connectivity(outs)
    assert c.shape == (2,) and torch.isfinite(c).all()
    torch.testing.assert_close(c, expected, rtol=1e-10, atol=1e-12)
    assert c.abs().max() > 1e-3  # a real signal, not zeros
    # a pruned network: the masked weights are used
    so.prune.apply(model, "magnitude", 0.5)
    torch.testing.assert_close(connectivity(model, probe), _direct_connectivity(_direct_outputs(model, probe)),
                               rtol=1e-10, atol=1e-12)


def test_connectivity_sign_follows_correlation():
    # two 1-unit layers, y2 = -3·y1 + 1: perfectly anti-correlated → c = -1; bare tensor probe works
    lin1, lin2 = nn.Linear(2, 1).double(), nn.Linear(1, 1).double()
    with torch.no_grad():
        lin2.weight.fill_(-3.0)
        lin2.bias.fill_(1.0)
    model = nn.Sequential(lin1, lin2)
    x = torch.randn(50, 2, dtype=torch.float64)
    c = connectivity(model, x)
    assert c.shape == (1,) and float(c[0]) == pytest.approx(-1.0, abs=1e-12)


def test_connectivity_of_an_ode_model_uses_the_fixed_step_field_evaluations():
    from torchdiffeq import odeint

    torch.manual_seed(0)
    f = so.models.MLPVectorField(2, (6, 5), time="concatsquash", activation="tanh")
    node = so.models.NeuralODE(f, method="dopri5", rtol=1e-6, atol=1e-6)
    x = torch.randn(9, 2)
    c = connectivity(node, [(x,)], n_steps=3)
    assert node.method == "dopri5" and node.options is None  # restored
    rec = [[] for _ in f.layers]
    hs = [layer.linear.register_forward_hook(lambda m, i, o, k=k: rec[k].append(o.detach()))
          for k, layer in enumerate(f.layers)]
    odeint(f, x, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 1 / 3})
    for h in hs:
        h.remove()
    outs = [torch.cat(r) for r in rec]
    assert outs[0].shape == (9 * 12, 6)  # rk4: 4 evaluations per step, 3 steps
    assert c.shape == (2,)  # time hyper-networks (in_features == 1) are not part of the chain
    torch.testing.assert_close(c, _direct_connectivity(outs), rtol=1e-5, atol=1e-7)


def test_gradient_flow_matches_direct_masked_gradients():
    torch.manual_seed(0)
    model = mlp((3, 6, 4, 2))
    probe = batches(3, bs=5)
    so.prune.apply(model, "magnitude", 0.6)
    g = gradient_flow(model, mse, probe)
    lins = [model[0], model[2], model[4]]
    per = []
    for b in probe:
        ws = [(m.weight_orig * m.weight_mask).detach().clone().requires_grad_(True) for m in lins]
        h = b[0]
        for i, (m, w) in enumerate(zip(lins, ws)):
            h = h @ w.T + m.bias
            if i < 2:
                h = torch.tanh(h)
        loss = ((h - b[1]) ** 2).mean()
        gs = torch.autograd.grad(loss, ws)
        per.append(torch.stack([(gw * m.weight_mask).norm() for gw, m in zip(gs, lins)]))
    expected = torch.stack(per).mean(0)
    assert g.shape == (3,)
    torch.testing.assert_close(g, expected.double(), rtol=1e-10, atol=1e-14)
    # the pruned entries' gradients are non-zero in the dense gradient: excluding them matters
    assert all((gs[i] * (1 - lins[i].weight_mask)).norm() > 0 for i in range(3))


def test_connectivity_measure_rule_and_reference_modes():
    torch.manual_seed(0)
    data = batches(6, bs=16)
    model = mlp((3, 12, 12, 2))
    loop_fit(model, data, epochs=20, lr=1e-2)
    probe = batches(2, bs=32, seed=5)
    icp = so.prune.ICP(probe=probe, loss_fn=mse, eps_info=0.05, eps_grad=0.3, early_exit=False)
    assert isinstance(icp.measure, ConnectivityMeasure)  # the default measure
    assert "connectivity" in so.prune.ICP_MEASURES
    icp.reference(model)
    c0, g0 = connectivity(model, probe), gradient_flow(model, mse, probe)
    so.prune.apply(model, "magnitude", 0.5)
    ok, vals = icp.check(model)
    c1, g1 = connectivity(model, probe), gradient_flow(model, mse, probe)
    info = float((c1 - c0).norm())
    grad = float((g1 - g0).norm() / g0.norm())
    assert vals["info"] == pytest.approx(info, rel=1e-10)
    assert vals["grad"] == pytest.approx(grad, rel=1e-10)
    assert ok == (info < 0.05 and grad < 0.3)
    assert info > 0 and grad > 0
    # "dense": later references are ignored; "previous": the reference follows the network
    icp.reference(model)
    assert icp.check(model)[1]["info"] == pytest.approx(info, rel=1e-10)
    prev = so.prune.ICP("connectivity", probe=probe, loss_fn=mse, reference="previous")
    prev.reference(model)
    ok2, v2 = prev.check(model)
    assert ok2 and v2["info"] == 0 and v2["grad"] == 0


def test_early_exit_when_probe_loss_is_back():
    torch.manual_seed(0)
    data = batches(6, bs=16)
    model = mlp((3, 12, 12, 2))
    loop_fit(model, data, epochs=5, lr=1e-2)
    probe = data[:2]  # the training data: retraining brings its loss below the (undertrained) reference
    icp = so.prune.ICP(probe=probe, loss_fn=mse, eps_info=1e-9, eps_grad=1e-9, check_every=2, min_steps=0)
    icp.reference(model)
    so.prune.apply(model, "magnitude", 0.2)
    icp.start()
    res = loop_fit(model, data, epochs=20, lr=1e-2, callbacks=[icp])
    rec = icp.finish()
    assert rec["reason"] == "recovered" and res.stopped_early
    last = rec["checks"][-1]
    assert last["loss"] <= last["ref_loss"] and not last["consistent"]
    assert all(ch["loss"] > ch["ref_loss"] for ch in rec["checks"][:-1])


def test_bad_input_names_the_argument():
    probe = batches(1)
    for kw in ({"eps_info": 0}, {"eps_grad": -1.0}, {"eps_info": math.inf}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            so.prune.ICP("connectivity", probe=probe, **kw)
    with pytest.raises(ValueError, match="reference"):
        so.prune.ICP("connectivity", probe=probe, reference="init")
    with pytest.raises(ValueError, match="measure"):
        so.prune.ICP("conectivity", probe=probe)
    with pytest.raises(ValueError, match="probe"):
        connectivity(mlp(), [])
    with pytest.raises(ValueError, match="probe"):
        so.prune.ICP(probe=[])
    with pytest.raises(ValueError, match="model"):
        connectivity(nn.Sequential(nn.Linear(3, 2)).double(), probe)
    with pytest.raises(ValueError, match="model"):
        connectivity(mlp(), probe, filter_fn=lambda n, m: n == "0")


def test_stacked_cnf_pairs_per_field_and_fixed_probe_noise():
    from torchdiffeq import odeint

    torch.manual_seed(0)
    fields = [so.models.MLPVectorField(2, (5, 4), time="concat") for _ in range(2)]
    cnf = so.models.CNF(fields, trace="hutchinson", method="dopri5")
    x = torch.randn(6, 2)
    c = connectivity(cnf, [(x,)], n_steps=2)
    assert c.shape == (4,)  # (3 layers − 1) pairs in each of the 2 fields
    torch.testing.assert_close(connectivity(cnf, [(x,)], n_steps=2), c, rtol=0, atol=0)  # same probe noise
    # field 0 sees the data x: its pairs equal a direct fixed-step solve of that field alone
    rec = [[] for _ in range(3)]
    hs = [layer.linear.register_forward_hook(lambda m, i, o, k=k: rec[k].append(o.detach()))
          for k, layer in enumerate(fields[0].layers)]
    odeint(fields[0], x, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 0.5})
    for h in hs:
        h.remove()
    torch.testing.assert_close(c[:2], _direct_connectivity([torch.cat(r) for r in rec]), rtol=1e-5, atol=1e-7)
    g = gradient_flow(cnf, lambda m, b: -m.log_prob(b[0]).mean(), [(x,)], n_steps=2)
    assert g.shape == (6,) and (g > 0).all()
