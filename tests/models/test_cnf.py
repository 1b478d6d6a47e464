import math

import pytest
import torch
from torch import nn

from sparseode.models import CNF, MLPVectorField
from sparseode.models import cnf as cnf_mod
from sparseode.models.cnf import exact_trace, hutchinson_trace, standard_normal_logprob


class LinearField(nn.Module):
    """f(t, x) = x A^T: the flow map is expm(A t), the trace tr(A)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.dim = a.shape[0]

    def forward(self, t, x):
        return x @ self.a.T


class CountingField(nn.Module):
    def __init__(self, field):
        super().__init__()
        self.inner = field
        self.dim = field.dim
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        return self.inner(t, x)


def _brute_trace(field, t, x):
    traces = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: field(t, v[None])[0], row)
        traces.append(torch.diagonal(jac).sum())
    return torch.stack(traces)


@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("time", [None, "concat", "concatsquash"])
def test_exact_trace_matches_brute_force_jacobian(dim, time):
    f = MLPVectorField(dim, (12, 12), time=time, activation="softplus").double()
    x = torch.randn(7, dim, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    dx, neg_tr = exact_trace(f, t, x)
    torch.testing.assert_close(dx, f(t, x))
    torch.testing.assert_close(-neg_tr, _brute_trace(f, t, x))


def test_exact_trace_any_leading_shape_and_grad_mode():
    f = MLPVectorField(3, (8,)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    t = torch.tensor(0.0, dtype=torch.float64)
    dx, neg_tr = exact_trace(f, t, x)
    assert dx.shape == (2, 5, 3) and neg_tr.shape == (2, 5)
    torch.testing.assert_close(neg_tr.reshape(-1), exact_trace(f, t, x.reshape(10, 3))[1])
    assert neg_tr.requires_grad  # differentiable w.r.t. parameters when grad mode is on
    with torch.no_grad():
        dx2, tr2 = exact_trace(f, t, x)
    assert not tr2.requires_grad and not dx2.requires_grad
    torch.testing.assert_close(tr2, neg_tr.detach())


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(noise):
    f = MLPVectorField(4, (16, 16), activation="tanh").double()
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor(0.0, dtype=torch.float64)
    exact = -exact_trace(f, t, x)[1]
    m = 20000  # one probe per copy of x
    xs = x.expand(m, 3, 4).contiguous()
    probe = cnf_mod.NOISES[noise](xs)
    if noise == "rademacher":
        assert set(probe.unique().tolist()) == {-1.0, 1.0}
    est = -hutchinson_trace(f, t, xs, probe)[1]  # (m, 3)
    mean, sem = est.mean(0), est.std(0) / math.sqrt(m)
    assert torch.all((mean - exact).abs() < 5 * sem + 1e-12), (mean, exact, sem)
    assert torch.all(est.std(0) > 0)  # it really is a random estimate


def test_log_prob_of_a_linear_flow_is_analytic():
    a = torch.tensor([[-0.5, 0.8], [-0.3, 0.4]], dtype=torch.float64)
    cnf = CNF(LinearField(a), T=1.5, rtol=1e-9, atol=1e-9)
    x = torch.randn(20, 2, dtype=torch.float64)
    z = x @ torch.linalg.matrix_exp(1.5 * a).T
    expected = standard_normal_logprob(z) + 1.5 * torch.trace(a)
    torch.testing.assert_close(cnf.log_prob(x), expected, rtol=1e-7, atol=1e-7)
    # sampling inverts the flow: decode(z) = expm(-A T) z
    torch.testing.assert_close(cnf.sample(20, z=z), x, rtol=1e-7, atol=1e-7)


def test_log_prob_integrates_to_one():
    torch.manual_seed(1)
    f = MLPVectorField(2, (16, 16), time="concat", activation="tanh")
    for p in f.parameters():  # a visibly non-Gaussian flow
        p.data.mul_(2.0)
    cnf = CNF(f, rtol=1e-5, atol=1e-5)
    n, lim = 121, 7.0
    g = torch.linspace(-lim, lim, n)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        logp = cnf.log_prob(pts)
    mass = logp.exp().sum() * (2 * lim / (n - 1)) ** 2
    assert abs(float(mass) - 1.0) < 0.02
    assert (logp - standard_normal_logprob(pts)).abs().max() > 0.3  # and it is not the base density


def test_sample_with_log_prob_agrees_with_log_prob_and_encode_inverts():
    torch.manual_seed(2)
    cnf = CNF(MLPVectorField(2, (16,), time="concatsquash"), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        x, logp = cnf.sample(50, return_log_prob=True)
        assert x.shape == (50, 2) and logp.shape == (50,)
        torch.testing.assert_close(cnf.log_prob(x), logp, rtol=1e-4, atol=1e-4)
        z, _ = cnf.encode(x)
        torch.testing.assert_close(cnf.sample(50, z=z), x, rtol=1e-4, atol=1e-4)


def test_stacked_flows_chain():
    torch.manual_seed(3)
    f1, f2 = MLPVectorField(2, (8,)), MLPVectorField(2, (8,), time="concat")
    stacked = CNF([f1, f2], rtol=1e-7, atol=1e-7).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    c1 = CNF(f1, rtol=1e-7, atol=1e-7)
    c2 = CNF(f2, rtol=1e-7, atol=1e-7)
    z1, logdet1 = c1.encode(x)
    expected = c2.log_prob(z1) + logdet1
    torch.testing.assert_close(stacked.log_prob(x), expected)
    z = torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(stacked.sample(10, z=z), c1.sample(10, z=c2.sample(10, z=z)))
    assert len(stacked.fields) == 2
    with pytest.raises(AttributeError):
        stacked.field


def test_nfe_counts_field_evaluations_of_the_last_solve():
    field = CountingField(MLPVectorField(2, (8,)))
    cnf = CNF(field, rtol=1e-4, atol=1e-4)
    x = torch.randn(16, 2)
    cnf.log_prob(x)
    assert cnf.nfe == field.calls > 0
    field.calls = 0
    with torch.no_grad():
        cnf.sample(16)
    assert cnf.nfe == field.calls > 0
    stacked = CNF([field, field], rtol=1e-4, atol=1e-4)
    field.calls = 0
    stacked.log_prob(x)
    assert stacked.nfe == field.calls


def test_hutchinson_probe_drawn_once_per_solve(monkeypatch):
    seen = []

    def recording(field, t, x, noise):
        seen.append(noise)
        return hutchinson_trace(field, t, x, noise)

    monkeypatch.setitem(cnf_mod.TRACES, "hutchinson", recording)
    cnf = CNF(MLPVectorField(2, (8,)), trace="hutchinson", noise="rademacher", rtol=1e-4, atol=1e-4)
    x = torch.randn(32, 2)
    cnf.log_prob(x)
    assert len(seen) == cnf.nfe > 1
    assert all(s is seen[0] for s in seen) and cnf._noise is seen[0]
    assert cnf._noise.shape == x.shape
    first = cnf._noise
    cnf.log_prob(x)
    assert cnf._noise is not first  # a new probe for the next solve


def test_trace_registry_is_pluggable(monkeypatch):
    def jacobian_trace(field, t, x, noise):
        with torch.enable_grad():
            return field(t, x), -_brute_trace(field, t, x)

    monkeypatch.setitem(cnf_mod.TRACES, "brute", jacobian_trace)
    f = MLPVectorField(2, (8,)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    a = CNF(f, trace="brute", rtol=1e-8, atol=1e-8).log_prob(x)
    b = CNF(f, trace="exact", rtol=1e-8, atol=1e-8).log_prob(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("trace,stacked", [("exact", False), ("hutchinson", False), ("hutchinson", True)])
def test_adjoint_gradients_match_backprop(trace, stacked):
    torch.manual_seed(4)
    f = MLPVectorField(2, (8, 8), time="concatsquash", activation="softplus").double()
    flows = [f, MLPVectorField(2, (8,)).double()] if stacked else f
    params = list(nn.ModuleList(flows if stacked else [f]).parameters())
    x = torch.randn(12, 2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        cnf = CNF(flows, trace=trace, rtol=1e-9, atol=1e-9, adjoint=adjoint)
        torch.manual_seed(5)  # same Hutchinson probes in both runs
        for p in params:
            p.grad = None
        cnf.log_prob(x).mean().backward()
        grads.append([p.grad.clone() for p in params])
    for g_bp, g_adj in zip(*grads):
        torch.testing.assert_close(g_adj, g_bp, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_named():
    f = MLPVectorField(2, (8,))
    with pytest.raises(ValueError, match="trace"):
        CNF(f, trace="fused")
    with pytest.raises(ValueError, match="noise"):
        CNF(f, noise="uniform")
    with pytest.raises(ValueError, match="method"):
        CNF(f, method="rk45")
    with pytest.raises(ValueError, match="T must"):
        CNF(f, T=0)
    with pytest.raises(ValueError, match="stacked fields"):
        CNF([f, MLPVectorField(3, (8,))])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        CNF(f).log_prob(torch.randn(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        CNF(f).log_prob(torch.ones(4, 2, dtype=torch.long))
