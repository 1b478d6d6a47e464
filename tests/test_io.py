"""so.save / so.load: every model kind, dense, pruned and sparsified, through a file that
torch.load(weights_only=True) reads; clear errors for files that are not sparseode checkpoints."""
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparseode as so
from sparseode import checkpoint
from sparseode.models import CNF, MLPVectorField, NeuralODE, ODEClassifier
from sparseode.nn import SparseLinear
from sparseode.nn.field import SparseMLPField


def _prune(module, amount=0.8):
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            prune.random_unstructured(layer, "weight", amount=amount)
    return module


BUILDERS = {
    "field-autonomous": lambda: MLPVectorField(3, (16, 16)),
    "field-concat": lambda: MLPVectorField(3, (16, 16), time="concat", activation="softplus"),
    "field-concatsquash": lambda: MLPVectorField(3, 16, time="concatsquash"),
    "cnf": lambda: CNF(MLPVectorField(2, (16, 16), time="concat"), trace="hutchinson", noise="rademacher",
                       rtol=1e-4, atol=1e-4, T=0.5),
    "cnf-stacked": lambda: CNF([MLPVectorField(3, (16,), time="concat"), MLPVectorField(3, (16,))],
                               method="rk4", options={"step_size": 0.25}),
    "neural-ode": lambda: NeuralODE(MLPVectorField(3, (16,), time="concatsquash"), t=(0.0, 0.5), rtol=1e-4,
                                    atol=1e-4),
    "classifier": lambda: ODEClassifier(5, (16, 16), 3, time="concat", embed_dim=4, augment=1, rtol=1e-4,
                                        atol=1e-4),
    "linear": lambda: nn.Linear(16, 8),
}
STATES = ("dense", "pruned", "sparse-csr", "sparse-bsr", "sparse-masked")


def _model(kind, state, seed=0):
    torch.manual_seed(seed)
    model = BUILDERS[kind]()
    if state == "dense":
        return model
    _prune(model)
    if state == "pruned":
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BSR on small random masks
        return so.sparsify(model, format=state.removeprefix("sparse-"), block=(4, 4))


def _outputs(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(model, (MLPVectorField, SparseMLPField)):
            return model(torch.tensor(0.2), torch.randn(6, model.dim, generator=gen))
        if isinstance(model, CNF):
            torch.manual_seed(2)  # the Hutchinson probe
            return model.log_prob(torch.randn(6, model.dim, generator=gen))
        if isinstance(model, NeuralODE):
            return model(torch.randn(6, 3, generator=gen))
        if isinstance(model, ODEClassifier):
            return model(torch.randn(6, 5, generator=gen))
        return model(torch.randn(6, model.in_features, generator=gen))


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_then_load_gives_back_the_model(kind, state, tmp_path):
    model = _model(kind, state)
    model.eval()
    path = tmp_path / "model.pt"
    so.save(model, path)
    loaded = so.load(path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    assert not loaded.training
    for name, layer in model.named_modules():
        if isinstance(layer, SparseLinear):
            twin = loaded.get_submodule(name)
            assert (twin.format, twin.backend, twin.from_pruned) == (layer.format, layer.backend, layer.from_pruned)
    # the file is tensors and plain containers: weights_only reads it, and the config is JSON
    raw = torch.load(path, weights_only=True)
    json.dumps({k: v for k, v in raw.items() if k != "state_dict"})
    assert raw["model"]["__module__"] == type(so.densify(model)).__name__
    assert bool(raw["pruned"]) == (state != "dense")
    assert bool(raw["sparse"]) == state.startswith("sparse")


def test_a_loaded_pruned_model_keeps_its_masks_through_training(tmp_path):
    model = _model("classifier", "pruned")
    so.save(model, tmp_path / "m.pt")
    loaded = so.load(tmp_path / "m.pt")
    opt = torch.optim.SGD(loaded.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        loaded(torch.randn(8, 5)).pow(2).mean().backward()
        opt.step()
    for name, module in loaded.named_modules():
        if hasattr(module, "weight_mask"):
            assert torch.equal(module.weight_mask, model.get_submodule(name).weight_mask), name
            assert not (module.weight_orig * module.weight_mask)[module.weight_mask == 0].any(), name


def test_float64_and_backend_override(tmp_path):
    model = _model("field-concat", "sparse-csr").double()
    so.save(model, tmp_path / "m.pt")
    loaded = so.load(tmp_path / "m.pt", backend="torch")
    assert next(loaded.parameters()).dtype == torch.float64
    assert {m.backend for m in loaded.modules() if isinstance(m, SparseLinear)} == {"torch"}
    torch.testing.assert_close(_outputs(loaded.float()), _outputs(model.float()))


def test_saving_leaves_the_model_as_it_was(tmp_path):
    model = _model("cnf", "sparse-csr")
    types = [type(m) for m in model.modules()]
    so.save(model, tmp_path / "m.pt")
    assert [type(m) for m in model.modules()] == types


# --- errors ------------------------------------------------------------------------------------
def test_a_whole_pickled_model_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(_model("field-concat", "pruned"), path)
    with pytest.raises(ValueError, match=r"not a sparseode checkpoint: it holds pickled objects.*sparseode.save"):
        so.load(path)


def test_a_bare_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_model("field-concat", "pruned").state_dict(), path)
    with pytest.raises(ValueError, match=r"not a sparseode checkpoint .*a bare state dict"):
        so.load(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=r"not a sparseode checkpoint .*it holds list"):
        so.load(path)


def _rewrite(path, **changes):
    record = torch.load(path, weights_only=True)
    record.update(changes)
    torch.save(record, path)


def test_unknown_kind_and_version_mismatch_are_clear(tmp_path):
    path = tmp_path / "m.pt"
    so.save(_model("cnf", "pruned"), path)
    record = torch.load(path, weights_only=True)
    _rewrite(path, sparseode_checkpoint=99)
    with pytest.raises(ValueError, match=r"layout version 99 .* reads version 1"):
        so.load(path)
    record["model"]["config"]["field"]["__module__"] = "ResNetField"
    _rewrite(path, **record)
    with pytest.raises(ValueError, match=r"model\.field: unknown model kind 'ResNetField'"):
        so.load(path)


def test_a_model_kind_that_is_not_registered_is_a_clear_error(tmp_path):
    class MyField(nn.Module):
        def __init__(self, dim: int = 2):
            super().__init__()
            self.dim, self.lin = dim, nn.Linear(dim, dim)

        def forward(self, t, x):
            return self.lin(x)

    with pytest.raises(TypeError, match=r"CNF\.field is a MyField \(register its class"):
        so.save(CNF(MyField()), tmp_path / "m.pt")
    with pytest.raises(TypeError, match=r"so\.save stores models of the kinds"):
        so.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.pt")
    with pytest.raises(TypeError, match=r"CNF\.options\['grid'\] is a Tensor"):
        so.save(CNF(MLPVectorField(2, 4), method="rk4", options={"grid": torch.zeros(2)}), tmp_path / "m.pt")


def test_register_kind_adds_a_model_class(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "KINDS", dict(checkpoint.KINDS))

    class Scaled(nn.Module):
        def __init__(self, dim: int, scale: float):
            super().__init__()
            self.dim, self.scale, self.lin = dim, scale, nn.Linear(dim, dim)

        def config(self):
            return {"dim": self.dim, "scale": self.scale}

        def forward(self, t, x):
            return self.scale * self.lin(x)

    checkpoint.register_kind(Scaled)
    model = CNF(_prune(Scaled(3, 0.5)))
    so.save(model, tmp_path / "m.pt")
    loaded = so.load(tmp_path / "m.pt")
    assert loaded.field.scale == 0.5
    torch.testing.assert_close(_outputs(loaded), _outputs(model))
