import pytest
import torch
from torch import nn

from sparseode.models import MLPVectorField, NeuralODE, ODEClassifier


class LinearField(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        return x @ self.a.T


def test_neural_ode_solves_a_linear_system():
    a = torch.tensor([[0.0, 1.0], [-2.0, -0.3]], dtype=torch.float64)
    field = LinearField(a)
    ode = NeuralODE(field, t=(0.0, 2.0), rtol=1e-9, atol=1e-9)
    x = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(ode(x), x @ torch.linalg.matrix_exp(2.0 * a).T, rtol=1e-7, atol=1e-7)
    assert ode.nfe == field.calls > 0
    ts = torch.linspace(0, 2, 5, dtype=torch.float64)
    traj = ode.trajectory(x, ts)
    assert traj.shape == (5, 6, 2)
    for i, t in enumerate(ts):
        torch.testing.assert_close(traj[i], x @ torch.linalg.matrix_exp(t * a).T, rtol=1e-7, atol=1e-7)


def test_backwards_in_time_inverts():
    f = MLPVectorField(3, (8,), time="concat").double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = NeuralODE(f, t=(0.0, 1.0), rtol=1e-9, atol=1e-9)(x)
    torch.testing.assert_close(NeuralODE(f, t=(1.0, 0.0), rtol=1e-9, atol=1e-9)(y), x, rtol=1e-7, atol=1e-7)


def test_neural_ode_adjoint_gradients_match_backprop():
    f = MLPVectorField(3, (8, 8), time="concatsquash").double()
    x = torch.randn(5, 3, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        f.zero_grad()
        NeuralODE(f, rtol=1e-9, atol=1e-9, adjoint=adjoint)(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in f.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_classifier_structure_and_shapes():
    clf = ODEClassifier(4, (8, 8), 3)
    assert clf.field is clf.ode.field and isinstance(clf.ode, NeuralODE)
    assert clf.embed is None and clf.state_dim == 4
    x = torch.randn(10, 4)
    logits = clf(x)
    assert logits.shape == (10, 3) and clf.nfe > 0
    assert clf.predict(x).shape == (10,)
    # readout is linear in the ODE's final state
    torch.testing.assert_close(logits, clf.readout(clf.ode(x)))

    emb = ODEClassifier(4, 8, 3, embed_dim=6, augment=2, time="concat")
    assert emb.state_dim == 8 and emb.field.dim == 8
    h = torch.cat([emb.embed(x), torch.zeros(10, 2)], -1)
    torch.testing.assert_close(emb(x), emb.readout(emb.ode(h)))


def test_classifier_errors_name_arguments():
    with pytest.raises(ValueError, match="n_classes"):
        ODEClassifier(2, 8, 1)
    with pytest.raises(ValueError, match="augment"):
        ODEClassifier(2, 8, 2, augment=-1)
    with pytest.raises(ValueError, match="method"):
        ODEClassifier(2, 8, 2, method="nope")
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2\)"):
        ODEClassifier(2, 8, 2)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="t must"):
        NeuralODE(MLPVectorField(2, 4), t=(1.0, 1.0))
    with pytest.raises(ValueError, match="rtol"):
        NeuralODE(MLPVectorField(2, 4), rtol=0)
