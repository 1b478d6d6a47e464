"""Every importance formula against an independent flat-vector computation (autograd.functional)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

import sparseode as so
from prune_helpers import ODEReg, batches, flat_loss, mlp, mse

METHODS = ["magnitude", "snip", "taylor", "grasp", "grasp_abs"]


def _independent(model, data):
    names, shapes, theta, L, unflat = flat_loss(model, mse, data)
    g = torch.autograd.functional.jacobian(L, theta)
    H = torch.autograd.functional.hessian(L, theta)
    hg = H @ g
    ref = {
        "magnitude": theta.abs(),
        "snip": (theta * g).abs(),
        "taylor": -theta * g,  # ΔL of removing an entry, to first order
        "grasp": theta * hg,
        "grasp_abs": (theta * hg).abs(),
    }
    return {k: unflat(v) for k, v in ref.items()}, g, H


@pytest.mark.parametrize("method", METHODS)
def test_formulas_mlp(method):
    model = mlp()
    data = batches(3)
    ref, g, H = _independent(model, data)
    got = so.prune.importance(model, method, mse, data, n_batches=3)
    assert set(got) == set(ref[method])
    for k in got:
        assert got[k].shape == ref[method][k].shape
        torch.testing.assert_close(got[k], ref[method][k], rtol=1e-9, atol=1e-12)
    # the test is not vacuous: gradient and curvature are far from zero
    assert g.abs().max() > 1e-3 and H.abs().max() > 1e-3


@pytest.mark.parametrize("method", ["snip", "taylor", "grasp", "grasp_abs"])
def test_formulas_through_odeint(method):
    torch.manual_seed(0)
    model = ODEReg(dim=2, hidden=3, method="rk4").double()
    data = batches(2, bs=4, din=2, dout=2)
    ref, _, _ = _independent(model, data)
    got = so.prune.importance(model, method, mse, data, n_batches=2)
    for k in got:
        torch.testing.assert_close(got[k], ref[method][k], rtol=1e-8, atol=1e-12)


def test_snip_through_adaptive_solver_matches_flat():
    torch.manual_seed(0)
    model = ODEReg(dim=2, hidden=3, method="dopri5").double()
    data = batches(1, bs=4, din=2, dout=2)
    names, shapes, theta, L, unflat = flat_loss(model, mse, data)
    g = unflat(torch.autograd.functional.jacobian(L, theta))
    got = so.prune.importance(model, "taylor", mse, data, n_batches=1)
    for k in got:
        torch.testing.assert_close(got[k], -dict(model.named_parameters())[k].detach() * g[k])


def test_only_first_n_batches_are_averaged():
    model = mlp()
    data = batches(5)
    a = so.prune.importance(model, "grasp", mse, iter(data), n_batches=2)
    ref, _, _ = _independent(model, data[:2])
    for k in a:
        torch.testing.assert_close(a[k], ref["grasp"][k])


def test_pruned_model_uses_effective_weights_and_logical_names():
    model = mlp()
    torch_prune.random_unstructured(model[0], "weight", amount=0.5)
    mask = model[0].weight_mask.clone()
    data = batches(2)
    got = so.prune.importance(model, "taylor", mse, data, n_batches=2)
    assert "0.weight" in got and "0.weight_orig" not in got
    # independent: the same network with the effective weight as a plain parameter
    plain = mlp()
    plain.load_state_dict({k.replace("_orig", ""): v for k, v in model.state_dict().items() if not k.endswith("_mask")})
    with torch.no_grad():
        plain[0].weight.mul_(mask)
    ref, _, _ = _independent(plain, data)
    torch.testing.assert_close(got["0.weight"], ref["taylor"]["0.weight"])
    assert (got["0.weight"][mask == 0] == 0).all()
    mag = so.prune.importance(model, "magnitude")
    torch.testing.assert_close(mag["0.weight"], (model[0].weight_orig * mask).abs().detach())


def test_grasp_removes_what_graSP_removes():
    model = mlp()
    data = batches(3)
    ref, _, _ = _independent(model, data)
    graSP_score = {k: -v for k, v in ref["grasp"].items()}  # GraSP removes the highest -θ⊙Hg
    scores = so.prune.importance(model, "grasp", mse, data, n_batches=3)
    so.prune.apply(model, scores, 0.5, scope="global")
    allw = torch.cat([graSP_score[f"{i}.weight"].reshape(-1) for i in (0, 2, 4)])
    k = round(0.5 * allw.numel())
    expected_removed = torch.zeros_like(allw, dtype=torch.bool)
    expected_removed[torch.topk(allw, k).indices] = True
    got_removed = torch.cat([(model[i].weight_mask == 0).reshape(-1) for i in (0, 2, 4)])
    assert torch.equal(got_removed, expected_removed)


def test_random_is_seeded_uniform():
    model = mlp()
    a = so.prune.importance(model, "random", seed=3)
    b = so.prune.importance(model, "random", seed=3)
    c = so.prune.importance(model, "random", seed=4)
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].shape == dict(model.named_parameters())[k].shape
    assert not torch.equal(a["2.weight"], c["2.weight"])
    allv = torch.cat([v.reshape(-1) for v in a.values()])
    assert 0 <= allv.min() and allv.max() < 1


def test_errors_name_the_argument():
    model = mlp()
    data = batches(1)
    with pytest.raises(ValueError, match="method"):
        so.prune.importance(model, "obd", mse, data)
    with pytest.raises(ValueError, match="data"):
        so.prune.importance(model, "snip", mse, None)
    with pytest.raises(ValueError, match="n_batches"):
        so.prune.importance(model, "snip", mse, data, n_batches=0)
    with pytest.raises(ValueError, match="loss_fn"):
        so.prune.importance(model, "snip", lambda m, b: m(b[0]), data)


class _OnceDiffTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _OnceAct(nn.Module):
    def forward(self, x):
        return _OnceDiffTanh.apply(x)


@pytest.mark.parametrize("method", ["grasp", "grasp_abs"])
def test_grasp_without_second_derivative_is_a_clear_error(method):
    model = mlp(act=_OnceAct)
    data = batches(1)
    so.prune.importance(model, "snip", mse, data)  # first order works
    with pytest.raises(ValueError, match=f"method='{method}'.*second derivative"):
        so.prune.importance(model, method, mse, data)


def test_grasp_through_adjoint_is_a_clear_error():
    torch.manual_seed(0)
    model = ODEReg(dim=2, hidden=3, method="rk4", adjoint=True).double()
    data = batches(1, bs=4, din=2, dout=2)
    so.prune.importance(model, "snip", mse, data, n_batches=1)
    with pytest.raises(ValueError, match="method='grasp'.*second derivative"):
        so.prune.importance(model, "grasp", mse, data, n_batches=1)


@pytest.mark.parametrize("method", ["taylor", "grasp"])
def test_cnf_default_loss_is_nll_through_the_solve(method):
    """loss_fn=None on a CNF: the NLL through odeint (with the exact trace inside)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    f = so.models.MLPVectorField(2, (3,), time="concat", activation="sigmoid")
    cnf = so.models.CNF(f, trace="exact", method="rk4", options={"step_size": 0.5}).double()
    x = so.data.toy("gaussians", 6, seed=0, dtype=torch.float64)
    named = list(cnf.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def L(v):
        params, i = {}, 0
        for n, p in named:
            params[n] = v[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return -functional_call(cnf, params, (x,)).mean()

    g = torch.autograd.functional.jacobian(L, theta)
    ref = -theta * g if method == "taylor" else theta * (torch.autograd.functional.hessian(L, theta) @ g)
    got = so.prune.importance(cnf, method, None, [(x,)], n_batches=1)
    flat = torch.cat([got[n].reshape(-1) for n, _ in named])
    torch.testing.assert_close(flat, ref, rtol=1e-7, atol=1e-10)


def _removal_effects(model, loss_fn, batch):
    """The true change of the loss when each weight entry alone is set to zero, (out, in)."""
    w = model.weight
    with torch.no_grad():
        base = loss_fn(model, batch)
        out = torch.empty_like(w)
        for idx in torch.cartesian_prod(*(torch.arange(n) for n in w.shape)):
            i, j = idx.tolist()
            keep = w[i, j].clone()
            w[i, j] = 0.0
            out[i, j] = loss_fn(model, batch) - base
            w[i, j] = keep
    return out


def test_taylor_is_the_exact_removal_effect_when_the_loss_is_linear_in_each_weight():
    """loss = Σ c ⊙ (x Wᵀ) is linear in W: removing W_ij changes it by exactly -W_ij g_ij, so the
    taylor score is the true effect and apply keeps the weights whose removal would raise the loss."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 4, bias=False).double()
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    c = torch.randn(7, 4, generator=g, dtype=torch.float64)

    def loss_fn(m, batch):
        return (batch[0] @ m.weight.T * c).sum()

    true = _removal_effects(model, loss_fn, (x,))
    assert (true > 0).any() and (true < 0).any()  # both signs occur: the sign matters
    scores = so.prune.importance(model, "taylor", loss_fn, [(x,)], n_batches=1)
    torch.testing.assert_close(scores["weight"], true, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        before = float(loss_fn(model, (x,)))
    so.prune.apply(model, scores, 0.5)
    kept = model.weight_mask.bool().reshape(-1)
    expected = torch.zeros(20, dtype=torch.bool)
    expected[torch.topk(true.reshape(-1), 10).indices] = True  # largest rise in loss: keep
    assert torch.equal(kept, expected)
    # removing only the weights whose removal lowers the loss lowers it by their sum
    with torch.no_grad():
        after = float(loss_fn(model, (x,)))
    removed = true.reshape(-1)[~expected]
    assert after == pytest.approx(before + float(removed.sum()), rel=1e-12)


def test_taylor_plus_the_curvature_term_is_the_exact_removal_effect_on_a_quadratic():
    """On a least-squares loss (quadratic in W) removing W_ij changes the loss by exactly
    -W_ij g_ij + ½ W_ij² H_(ij)(ij): the taylor score is that effect to first order."""
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(4, 3, bias=False).double()
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    true = _removal_effects(model, mse, (x, y))
    w0 = model.weight.detach().clone()
    H = torch.autograd.functional.hessian(lambda w: ((x @ w.reshape(3, 4).T - y) ** 2).mean(), w0.reshape(-1))
    scores = so.prune.importance(model, "taylor", mse, [(x, y)], n_batches=1)["weight"]
    curvature = 0.5 * w0.reshape(-1) ** 2 * torch.diagonal(H)
    torch.testing.assert_close(scores.reshape(-1) + curvature, true.reshape(-1), rtol=1e-10, atol=1e-12)
    assert curvature.abs().max() > 1e-3  # the second-order term is not negligible here


def test_taylor_ranks_weights_as_their_removal_does_when_the_curvature_is_small():
    g = torch.Generator().manual_seed(2)
    model = nn.Linear(6, 5, bias=False).double()
    x = torch.randn(11, 6, generator=g, dtype=torch.float64)
    c = torch.randn(11, 5, generator=g, dtype=torch.float64)

    def loss_fn(m, batch):  # linear term plus a small quadratic one
        return (batch[0] @ m.weight.T * c).sum() + 1e-3 * (m.weight ** 2).sum()

    true = _removal_effects(model, loss_fn, (x,)).reshape(-1)
    scores = so.prune.importance(model, "taylor", loss_fn, [(x,)], n_batches=1)["weight"].reshape(-1)
    assert torch.equal(torch.argsort(scores), torch.argsort(true))
