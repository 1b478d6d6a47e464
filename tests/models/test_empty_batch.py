"""A batch of 0 points: every model returns empty outputs of the right shape and dtype (as torch
modules do) without calling the solver, and a backward pass gives the parameters zero gradients."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparseode as so
from sparseode.models import CNF, MLPVectorField, NeuralODE, ODEClassifier


def _field(dim: int = 2, sparse: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    field = MLPVectorField(dim, (8, 8), time="concat")
    if sparse is None:
        return field
    for module in field.modules():
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, "weight", amount=0.7)
    return so.sparsify(field, format=sparse)


def _assert_zero_grads(model: nn.Module) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    for p in params:
        assert p.grad is not None and p.grad.shape == p.shape
        assert torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("sparse", (None, "csr"))
@pytest.mark.parametrize("trace", ("exact", "hutchinson"))
@pytest.mark.parametrize("adjoint", (False, True))
def test_cnf_log_prob_of_no_points_is_empty_with_zero_gradients(sparse, trace, adjoint):
    cnf = CNF([_field(sparse=sparse), _field(sparse=sparse)], trace=trace, adjoint=adjoint)
    x = torch.empty(0, 2, dtype=torch.float32, requires_grad=True)
    logp = cnf.log_prob(x)
    assert logp.shape == (0,) and logp.dtype == torch.float32
    logp.sum().backward()
    _assert_zero_grads(cnf)
    assert x.grad is not None and x.grad.shape == (0, 2)


@pytest.mark.parametrize("sparse", (None, "csr"))  # forward mode: tangents through the layers or the fused op
@pytest.mark.parametrize("trace", ("exact", "hutchinson"))
@pytest.mark.parametrize("inference_trace", ("forward", "autograd"))
def test_cnf_log_prob_of_no_points_without_grad(sparse, trace, inference_trace):
    cnf = CNF(_field(sparse=sparse), trace=trace, inference_trace=inference_trace).double()
    with torch.no_grad():
        logp = cnf.log_prob(torch.empty(3, 0, 2, dtype=torch.float64))
    assert logp.shape == (3, 0) and logp.dtype == torch.float64
    assert not logp.requires_grad


def test_cnf_empty_batch_still_checks_the_dimension():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        CNF(_field()).log_prob(torch.empty(0, 3))


def test_cnf_samples_zero_points():
    cnf = CNF(_field())
    assert cnf.sample(0).shape == (0, 2)
    x, logp = cnf.sample(0, return_log_prob=True)
    assert x.shape == (0, 2) and logp.shape == (0,)
    assert cnf.decode(torch.empty(0, 2)).shape == (0, 2)
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        cnf.sample(-1)


def test_cnf_after_an_empty_batch_still_solves():
    cnf = CNF(_field())
    cnf.log_prob(torch.empty(0, 2))
    x = torch.randn(4, 2)
    logp = cnf.log_prob(x)
    assert logp.shape == (4,) and torch.isfinite(logp).all()
    assert cnf.nfe > 2  # an adaptive solve, not the empty shortcut


@pytest.mark.parametrize("adjoint", (False, True))
def test_neural_ode_trajectory_of_no_points(adjoint):
    ode = NeuralODE(_field(sparse="csr"), adjoint=adjoint)
    x = torch.empty(0, 2)
    assert ode(x).shape == (0, 2)
    traj = ode.trajectory(x, [0.0, 0.5, 1.0])
    assert traj.shape == (3, 0, 2) and traj.is_contiguous()
    traj.sum().backward()
    _assert_zero_grads(ode)


def test_classifier_on_no_points():
    clf = ODEClassifier(3, 8, 4, augment=1)
    x = torch.empty(0, 3)
    logits = clf(x)
    assert logits.shape == (0, 4)
    assert clf.predict(x).shape == (0,) and clf.predict(x).dtype == torch.int64
    logits.sum().backward()
    _assert_zero_grads(clf)
