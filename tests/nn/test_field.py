"""Sparse vector fields and the forward-mode trace: same values, NFE and gradients as the masked
dense models, for every model type."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparseode as so
from sparseode.models import CNF, MLPVectorField, NeuralODE, ODEClassifier
from sparseode.models.forward_mode import forward_with_tangents
from sparseode.nn.field import SparseMLPField
from sparseode.nn.folded import FoldedConcatLinear
from sparseode.nn.sparse_linear import SparseLinear

TIMES = (None, "concat", "concatsquash")


def _prune_field(field: nn.Module, amount: float = 0.8) -> nn.Module:
    for name, module in field.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(("gate", "hyper_bias")):
            prune.l1_unstructured(module, "weight", amount=amount)
    return field


def _field(time, dim=2, hidden=(24, 24), activation="tanh", seed=0):
    torch.manual_seed(seed)
    return _prune_field(MLPVectorField(dim, hidden, time=time, activation=activation))


def _rel(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("time", TIMES)
@pytest.mark.parametrize("activation", ("tanh", "softplus", "swish", "elu"))
def test_tangents_match_autograd_jacobian(time, activation):
    field = so.sparsify(_field(time, dim=3, activation=activation), format="csr")
    x = torch.randn(5, 3)
    t = torch.tensor(0.7)
    with torch.no_grad():
        f, jv = forward_with_tangents(field, t, x, torch.eye(3).unsqueeze(0))
    jac = torch.autograd.functional.jacobian(lambda z: field(t, z).sum(0), x)  # (out, B, in)
    torch.testing.assert_close(f, field(t, x).detach())
    torch.testing.assert_close(jv, jac.permute(1, 2, 0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("trace", ("exact", "hutchinson"))
@pytest.mark.parametrize("time", TIMES)
@pytest.mark.parametrize("sparse", (False, True), ids=("dense", "sparse"))
def test_forward_mode_log_prob_matches_autograd(trace, time, sparse):
    field = _field(time, dim=5 if trace == "exact" else 2)
    if sparse:
        field = so.sparsify(field, format="csr")
    x = torch.randn(64, field.dim)
    # fixed steps: both dynamics are evaluated at the same points, so only their values can differ
    fixed = dict(method="rk4", options={"step_size": 0.1})
    autograd_cnf = CNF(field, trace=trace, inference_trace="autograd", **fixed)
    forward_cnf = CNF(field, trace=trace, **fixed)
    with torch.no_grad():
        torch.manual_seed(1)
        want = autograd_cnf.log_prob(x)
        torch.manual_seed(1)  # the same probe
        got = forward_cnf.log_prob(x)
    assert _rel(got, want) < 1e-5
    # and under the adaptive solver the two paths take the same steps
    adaptive_autograd, adaptive_forward = (CNF(field, trace=trace, inference_trace=mode) for mode in ("autograd", "forward"))
    with torch.no_grad():
        torch.manual_seed(1)
        adaptive_autograd.log_prob(x)
        torch.manual_seed(1)
        adaptive_forward.log_prob(x)
    assert adaptive_forward.nfe == adaptive_autograd.nfe


@pytest.mark.parametrize("fmt", ("csr", "bsr", "masked"))
@pytest.mark.parametrize("time", TIMES)
def test_sparsified_cnf_matches_masked_dense(fmt, time):
    dense = _field(time, hidden=(32, 32))
    if fmt == "bsr":  # the 2-wide first and last layers do not tile into 8x8 blocks
        with pytest.warns(UserWarning, match="does not tile"):
            sparse_field = so.sparsify(_field(time, hidden=(32, 32)), format=fmt, block=(8, 8))
    else:
        sparse_field = so.sparsify(_field(time, hidden=(32, 32)), format=fmt)
    sparse_cnf = CNF(sparse_field)
    dense_cnf = CNF(dense)
    assert isinstance(sparse_cnf.field, SparseMLPField)
    if time == "concat":
        assert all(isinstance(layer, FoldedConcatLinear) for layer in sparse_cnf.field.layers)
    x = torch.randn(128, 2)
    with torch.no_grad():
        want, got = dense_cnf.log_prob(x), sparse_cnf.log_prob(x)
    assert _rel(got, want) < 1e-5
    assert sparse_cnf.nfe == dense_cnf.nfe
    with torch.no_grad():
        torch.manual_seed(3)
        s_dense = dense_cnf.sample(50)
        torch.manual_seed(3)
        s_sparse = sparse_cnf.sample(50)
    torch.testing.assert_close(s_sparse, s_dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adjoint", (False, True), ids=("backprop", "adjoint"))
def test_sparsified_cnf_gradients_match(adjoint):
    dense_cnf = CNF(_field("concatsquash"), adjoint=adjoint, rtol=1e-6, atol=1e-6)
    sparse_cnf = CNF(so.sparsify(_field("concatsquash"), format="csr"), adjoint=adjoint, rtol=1e-6, atol=1e-6)
    x = torch.randn(32, 2)
    dense_cnf.log_prob(x).mean().backward()
    sparse_cnf.log_prob(x).mean().backward()
    for dense_layer, sparse_layer in zip(dense_cnf.field.layers, sparse_cnf.field.layers):
        g_dense = dense_layer.linear.weight_orig.grad * dense_layer.linear.weight_mask
        sl = sparse_layer.linear
        g_sparse = so.ops.reference.dense_weight(sl.sparse.values.grad, sl.sparse.pattern)
        torch.testing.assert_close(g_sparse, g_dense, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(sparse_layer.gate.weight.grad, dense_layer.gate.weight.grad, atol=1e-4, rtol=1e-3)


def test_stacked_flows_and_neural_ode_and_classifier_match():
    torch.manual_seed(0)
    stacked_dense = CNF([_field("concatsquash", seed=1), _field("concatsquash", seed=2)])
    stacked_sparse = CNF([so.sparsify(_field("concatsquash", seed=s), format="csr") for s in (1, 2)])
    x = torch.randn(40, 2)
    with torch.no_grad():
        assert _rel(stacked_sparse.log_prob(x), stacked_dense.log_prob(x)) < 1e-5
    assert stacked_sparse.nfe == stacked_dense.nfe

    node_dense, node_sparse = NeuralODE(_field("concat")), NeuralODE(so.sparsify(_field("concat"), format="csr"))
    with torch.no_grad():  # states cross 0 on the way (0.008 here): compare each element with atol beside rtol
        torch.testing.assert_close(node_sparse(x), node_dense(x), rtol=1e-5, atol=1e-6)
    assert node_sparse.nfe == node_dense.nfe

    def classifier():
        torch.manual_seed(4)
        clf = ODEClassifier(8, (32, 32), 3)
        _prune_field(clf.field)
        return clf

    clf_dense, clf_sparse = classifier(), so.sparsify(classifier(), format="csr")
    assert isinstance(clf_sparse.field, SparseMLPField)
    xc = torch.randn(20, 8)
    with torch.no_grad():  # logits near 0 (0.004 here): a relative error of each element alone is noise
        torch.testing.assert_close(clf_sparse(xc), clf_dense(xc), rtol=1e-5, atol=1e-6)
    assert clf_sparse.nfe == clf_dense.nfe


def test_training_continues_on_the_sparsified_model_and_the_pattern_holds():
    from sparseode.train import fit

    cnf = CNF(so.sparsify(_field("concat", hidden=(16, 16)), format="csr"), rtol=1e-3, atol=1e-3)
    layers = [m for m in cnf.modules() if isinstance(m, SparseLinear)]
    before = [layer.weight.detach().clone() for layer in layers]
    data = so.data.toy("8gaussians", n=256, seed=0)
    fit(cnf, data, epochs=1, batch_size=64, lr=1e-2, weight_decay=0.1, progress=False)
    for layer, old in zip(layers, before):
        new = layer.weight.detach()
        assert torch.equal(new != 0, old != 0)  # pruned stays pruned, kept stays kept
        assert not torch.equal(new, old)  # and the stored values did train
