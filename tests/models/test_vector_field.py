import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchdiffeq import odeint

from sparseode.models import ACTIVATIONS, ConcatLinear, ConcatSquashLinear, MLPVectorField
from sparseode.models import vector_field as vf

REFERENCE_ACTIVATIONS = {
    "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
    "softplus": lambda x: torch.log1p(torch.exp(x)),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "elu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "swish": lambda x: x / (1 + torch.exp(-x)),
}


def test_activation_registry_matches_formulas():
    assert set(ACTIVATIONS) == set(REFERENCE_ACTIVATIONS)
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    for name, ref in REFERENCE_ACTIVATIONS.items():
        torch.testing.assert_close(ACTIVATIONS[name](x), ref(x), msg=name)


def test_concat_linear_last_column_multiplies_t():
    layer = ConcatLinear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    t = 0.37
    w, b = layer.linear.weight, layer.linear.bias
    expected = x @ w[:, :3].T + t * w[:, 3] + b
    torch.testing.assert_close(layer(t, x), expected)
    # per-sample times, shaped (n,) and (n, 1), agree with one scalar call per row
    ts = torch.rand(5, dtype=torch.float64)
    rows = torch.stack([layer(ts[i], x[i:i + 1])[0] for i in range(5)])
    torch.testing.assert_close(layer(ts, x), rows)
    torch.testing.assert_close(layer(ts[:, None], x), rows)


def test_concatsquash_formula():
    layer = ConcatSquashLinear(3, 4).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor(0.8, dtype=torch.float64)
    lin, gate, hb = layer.linear, layer.gate, layer.hyper_bias
    assert hb.bias is None and gate.in_features == 1 and hb.in_features == 1
    expected = (x @ lin.weight.T + lin.bias) * torch.sigmoid(gate.weight[:, 0] * t + gate.bias) + hb.weight[:, 0] * t
    torch.testing.assert_close(layer(t, x), expected)


@pytest.mark.parametrize("time", [None, "concat", "concatsquash"])
def test_layers_contract_and_any_leading_shape(time):
    f = MLPVectorField(3, (7, 5), time=time, activation="softplus")
    assert isinstance(f.layers, nn.ModuleList) and len(f.layers) == 3
    assert f.time == time and f.activation == "softplus" and f.dim == 3
    kind = {None: nn.Linear, "concat": ConcatLinear, "concatsquash": ConcatSquashLinear}[time]
    assert all(type(layer) is kind for layer in f.layers)
    # every parameter lives in an nn.Linear
    for module in f.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, nn.Linear)
    x = torch.randn(2, 4, 3)
    out = f(torch.tensor(0.5), x)
    assert out.shape == (2, 4, 3)
    flat = f(torch.tensor(0.5), x.reshape(8, 3)).reshape(2, 4, 3)
    torch.testing.assert_close(out, flat)
    for layer in f.layers:  # each layer alone takes any leading shape too
        z = torch.randn(2, 4, layer.in_features)
        y = layer(z) if time is None else layer(0.1, z)
        assert y.shape == (2, 4, layer.out_features)


@pytest.mark.parametrize("activation", sorted(REFERENCE_ACTIVATIONS))
def test_forward_is_layer_act_layer_act_layer(activation):
    f = MLPVectorField(2, (6, 5), time="concat", activation=activation).double()
    x = torch.randn(9, 2, dtype=torch.float64)
    t = 0.25
    act = REFERENCE_ACTIVATIONS[activation]
    h = x
    for i, layer in enumerate(f.layers):
        w, b = layer.linear.weight, layer.linear.bias
        h = h @ w[:, :-1].T + t * w[:, -1] + b
        if i < len(f.layers) - 1:
            h = act(h)
    torch.testing.assert_close(f(t, x), h)


def test_autonomous_field_ignores_t_and_runs_in_odeint():
    f = MLPVectorField(2, 16)
    x = torch.randn(10, 2)
    torch.testing.assert_close(f(0.0, x), f(123.0, x))
    out = odeint(f, x, torch.tensor([0.0, 1.0]), rtol=1e-4, atol=1e-4)
    assert out.shape == (2, 10, 2) and torch.isfinite(out).all()


def test_adding_an_activation_is_one_entry(monkeypatch):
    monkeypatch.setitem(vf.ACTIVATIONS, "cube", lambda x: x ** 3)
    f = MLPVectorField(2, (4,), activation="cube").double()
    x = torch.randn(3, 2, dtype=torch.float64)
    l0, l1 = f.layers
    torch.testing.assert_close(f(0.0, x), l1(l0(x) ** 3))


class _MaskedLinear(nn.Module):
    """A stand-in for SparseLinear: same call signature, weight only readable."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._w = nn.Parameter(linear.weight.detach() * mask)
        self.bias = linear.bias

    @property
    def weight(self):
        return self._w.detach()

    def forward(self, x):
        return F.linear(x, self._w, self.bias)


@pytest.mark.parametrize("time", [None, "concat", "concatsquash"])
def test_linear_modules_can_be_swapped_for_a_drop_in(time):
    f = MLPVectorField(3, (8, 8), time=time).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    ref_weights = []
    for i, layer in enumerate(f.layers):
        lin = layer if time is None else layer.linear
        mask = (torch.rand_like(lin.weight) > 0.5).double()
        ref_weights.append(mask)
        if time is None:
            f.layers[i] = _MaskedLinear(lin, mask)
        else:
            layer.linear = _MaskedLinear(lin, mask)
    out = f(0.3, x)
    # reference: same network with masked dense weights computed by hand
    h = x
    for i, layer in enumerate(f.layers):
        lin = layer if time is None else layer.linear
        z = h if time != "concat" else torch.cat([h, torch.full_like(h[:, :1], 0.3)], -1)
        y = z @ lin.weight.T + lin.bias
        if time == "concatsquash":
            y = y * torch.sigmoid(layer.gate(torch.full_like(h[:, :1], 0.3))) + layer.hyper_bias(torch.full_like(h[:, :1], 0.3))
        h = torch.tanh(y) if i < 2 else y
    torch.testing.assert_close(out, h)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="activation"):
        MLPVectorField(2, 8, activation="gelu2")
    with pytest.raises(ValueError, match="time"):
        MLPVectorField(2, 8, time="hyper")
    with pytest.raises(ValueError, match="hidden"):
        MLPVectorField(2, (8, 0))
    with pytest.raises(ValueError, match="dim"):
        MLPVectorField(0, 8)
    f = MLPVectorField(2, 8, time="concat")
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        f(0.0, torch.randn(4, 3))
    with pytest.raises(ValueError, match="t must be"):
        f.layers[0](torch.zeros(3), torch.randn(4, 2))


def test_default_init_gives_finite_small_field():
    f = MLPVectorField(2, (64, 64, 64))
    out = f(0.0, torch.randn(1000, 2))
    assert torch.isfinite(out).all() and out.abs().max() < 10 * math.sqrt(2)
