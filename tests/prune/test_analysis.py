"""hessian_spectrum against the explicit Hessian restricted to the unpruned coordinates."""
from __future__ import annotations

import pytest
import torch

import sparseode as so
from prune_helpers import ODEReg, batches, flat_loss, mlp, mse


def _exact_restricted(model, data):
    names, shapes, theta, L, unflat = flat_loss(model, mse, data)
    H = torch.autograd.functional.hessian(L, theta)
    keep = []
    for n, s in zip(names, shapes):
        mod, _, t = n.rpartition(".")
        if t == "weight_orig":
            keep.append(dict(model.named_buffers())[f"{mod}.weight_mask"].reshape(-1) > 0)
        else:
            keep.append(torch.ones(s.numel(), dtype=torch.bool))
    keep = torch.cat(keep)
    return H[keep][:, keep]


def test_lanczos_full_dimension_is_exact_and_restricted_to_unpruned():
    model = mlp((3, 4, 2))
    so.prune.apply(model, "magnitude", 0.5)
    data = batches(2, bs=6)
    Hr = _exact_restricted(model, data)
    ev = torch.linalg.eigvalsh(Hr)
    spec = so.prune.hessian_spectrum(model, mse, data, n_batches=2, method="lanczos",
                                     n_iter=Hr.shape[0], n_hutchinson=0)
    assert spec.dim == Hr.shape[0] == 26 - 10  # 10 of 20 weights pruned, biases kept
    # a Krylov space holds each distinct eigenvalue once: every Ritz value is an eigenvalue,
    # and the extremes are found exactly
    got = torch.tensor(spec.eigenvalues, dtype=torch.float64)
    assert 1 < got.numel() <= ev.numel()
    assert ((got[:, None] - ev[None, :]).abs().min(dim=1).values < 1e-7).all()
    assert max(spec.eigenvalues) == pytest.approx(float(ev.max()), rel=1e-8)
    assert min(spec.eigenvalues) == pytest.approx(float(ev.min()), abs=1e-8)
    assert spec.top_eigenvalue == pytest.approx(float(ev[ev.abs().argmax()]), rel=1e-6)


def test_power_iteration_top_eigenvalue_and_hutchinson_trace():
    torch.manual_seed(0)
    model = ODEReg(dim=2, hidden=3, method="rk4").double()
    so.prune.apply(model, "magnitude", 0.3)
    data = batches(1, bs=8, din=2, dout=2)
    Hr = _exact_restricted(model, data)
    ev = torch.linalg.eigvalsh(Hr)
    top = float(ev[ev.abs().argmax()])
    second = float(ev.abs().sort().values[-2])
    assert abs(top) > 1.5 * second  # a spectral gap: power iteration must find it
    spec = so.prune.hessian_spectrum(model, mse, data, method="power", n_iter=300, tol=1e-10,
                                     n_hutchinson=400, seed=1)
    assert spec.top_eigenvalue == pytest.approx(top, rel=1e-5)
    tr = float(Hr.trace())
    assert abs(spec.trace - tr) < 4 * spec.trace_stderr + 1e-9
    assert spec.trace_stderr < 0.2 * abs(tr)


def test_hessian_spectrum_bad_input():
    model = mlp()
    with pytest.raises(ValueError, match="method"):
        so.prune.hessian_spectrum(model, mse, batches(1), method="arnoldi")
    with pytest.raises(ValueError, match="data"):
        so.prune.hessian_spectrum(model, mse, None)


def test_mode_coverage_over_checkpoints():
    import copy

    torch.manual_seed(0)
    f = so.models.MLPVectorField(2, (8,), time="concat", activation="sigmoid")
    cnf = so.models.CNF(f, method="rk4", options={"step_size": 0.5})
    hist = so.prune.iterative(cnf, lambda m, callbacks: None, schedule=[0.5, 0.2], progress=False)
    got = so.prune.mode_coverage(cnf, hist.checkpoints, "gaussians", n_samples=300, seed=3)
    assert [g["sparsity"] for g in got] == [r.sparsity for r in hist.rounds]
    for sd, g in zip(hist.checkpoints, got):
        m = copy.deepcopy(cnf)
        m.load_state_dict(sd)
        torch.manual_seed(3)
        with torch.no_grad():
            ref = so.data.mode_coverage(m.sample(300), "gaussians")
        assert g["coverage"] == ref
