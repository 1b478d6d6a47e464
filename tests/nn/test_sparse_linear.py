"""SparseLinear and sparsify/densify: drop-in behaviour, bad input, save/load, round trips."""
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparseode as so
from sparseode.nn import SparseLinear
from sparseode.nn import autoformat
from sparseode.ops import SparseWeight, use_backend
from sparseode.testing import FORMATS, backend_skip_reason


def _pruned_linear(n_in=24, n_out=16, amount=0.8, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    prune.random_unstructured(lin, "weight", amount=amount)
    return lin


def _mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 4))
    for layer in (m[0], m[2]):
        prune.l1_unstructured(layer, "weight", amount=0.85)
    return m


@pytest.mark.parametrize("fmt", FORMATS)
def test_drop_in_for_linear(fmt):
    lin = _pruned_linear()
    sl = SparseLinear.from_dense(lin, format=fmt, block=(4, 4))
    assert (sl.in_features, sl.out_features) == (24, 16)
    torch.testing.assert_close(sl.weight, lin.weight)
    for shape in [(24,), (1, 24), (3, 5, 24)]:
        x = torch.randn(shape)
        torch.testing.assert_close(sl(x), lin(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(AttributeError):
        sl.weight = torch.zeros(16, 24)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_round_trip_through_torch_save(fmt):
    sl = SparseLinear.from_dense(_pruned_linear(seed=1), format=fmt, block=(4, 4))
    buf = io.BytesIO()
    torch.save(sl.state_dict(), buf)
    buf.seek(0)
    # a layer built from another mask (other nnz) adopts the saved pattern
    other = SparseLinear.from_dense(_pruned_linear(seed=2, amount=0.5), format=fmt, block=(4, 4))
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.weight, sl.weight)
    assert torch.equal(other.bias, sl.bias)
    x = torch.randn(7, 24)
    torch.testing.assert_close(other(x), sl(x))


def test_whole_model_pickles():
    model = so.sparsify(_mlp(), format="csr")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_densify_sparsify_gives_back_identical_weights(fmt):
    reference, model = _mlp(), _mlp()
    sparse = so.sparsify(model, format=fmt, block=(16, 16))
    assert isinstance(sparse[0], SparseLinear) and isinstance(sparse[2], SparseLinear)
    assert isinstance(sparse[4], nn.Linear)  # not pruned, dense weight: left alone
    dense = so.densify(sparse)
    for i in (0, 2, 4):
        assert type(dense[i]) is nn.Linear
        assert torch.equal(dense[i].weight, reference[i].weight)
        assert torch.equal(dense[i].bias, reference[i].bias)
    for i in (0, 2):  # the torch.nn.utils.prune parametrisation is back
        assert torch.equal(dense[i].weight_mask, reference[i].weight_mask)


def test_sparsify_converts_zero_heavy_unpruned_layers_only():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        m[0].weight[torch.rand(16, 16) < 0.8] = 0
    m = so.sparsify(m, format="csr", max_density=0.5)
    assert isinstance(m[0], SparseLinear) and isinstance(m[1], nn.Linear)


def test_sparsify_filter_excludes_layers():
    m = so.sparsify(_mlp(), format="csr", filter_fn=lambda name, mod: name != "0")
    assert isinstance(m[0], nn.Linear) and isinstance(m[2], SparseLinear)


def test_auto_keeps_a_layer_dense_when_dense_measured_faster(monkeypatch):
    monkeypatch.setattr(autoformat, "choose_format", lambda *a, **k: "dense")
    monkeypatch.setattr(so.nn.convert, "choose_format", lambda *a, **k: "dense")
    m = so.sparsify(_mlp(), format="auto")
    assert isinstance(m[0], nn.Linear) and hasattr(m[0], "weight_mask")


def test_auto_choice_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEODE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autoformat, "_MEMORY", {})
    w = torch.randn(64, 64)
    mask = torch.rand(64, 64) < 0.05
    choice = autoformat.choose_format(w, mask, batch=64)
    assert choice in ("dense", "csr", "bsr")
    cached = (tmp_path / "formats.json").read_text()
    assert choice in cached and "64x64" in cached
    monkeypatch.setattr(autoformat, "_best_time", lambda fn, reps=7: pytest.fail("re-measured a cached shape"))
    assert autoformat.choose_format(w, mask, batch=64) == choice


def test_training_keeps_the_pattern():
    sl = SparseLinear.from_dense(_pruned_linear(), format="bsr", block=(4, 4))
    kept = sl.sparse.kept_mask()
    opt = torch.optim.AdamW(sl.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        sl(torch.randn(8, 24)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(sl.weight != 0, kept)


# --- bad input ----------------------------------------------------------------------------------
def test_errors_name_the_argument():
    lin = _pruned_linear()
    sl = SparseLinear.from_dense(lin, format="csr")
    with pytest.raises(ValueError, match="input has shape"):
        sl(torch.randn(3, 23))
    with pytest.raises(TypeError, match="dtype"):
        sl(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask has shape"):
        SparseWeight.from_dense(lin.weight, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="boolean"):
        SparseWeight.from_dense(lin.weight, torch.ones(16, 24))
    with pytest.raises(ValueError, match="does not tile"):
        SparseWeight.from_dense(lin.weight, format="bsr", block=(5, 5))
    with pytest.raises(ValueError, match="format must be one of"):
        SparseWeight.from_dense(lin.weight, format="coo")
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseLinear(sl.sparse, activation="gelu")
    with pytest.raises(ValueError, match="format must be one of"):
        so.sparsify(_mlp(), format="dense")
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseLinear.from_dense(lin, backend="mkl")(torch.randn(2, 24))


def test_half_precision_on_cpu_backend_is_a_clear_error():
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    sl = SparseLinear.from_dense(_pruned_linear().to(torch.bfloat16), format="csr", backend="cpu")
    with pytest.raises(RuntimeError, match="must be float32 or float64 on this backend, got BFloat16"):
        sl(torch.randn(2, 24, dtype=torch.bfloat16))
    # pinned to "cpu" while another backend is active, the layer checks before switching
    with use_backend("torch", "cpu"), pytest.raises(TypeError, match="supports dtypes float32, float64; got"):
        sl(torch.randn(2, 24, dtype=torch.bfloat16))
