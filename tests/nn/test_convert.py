"""sparsify/densify: copies by default, lossless round trips for every model kind the package
builds, formats chosen per layer (BSR only where blocks are full), plans shared between processes."""
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparseode as so
from sparseode.models import CNF, MLPVectorField, NeuralODE, ODEClassifier
from sparseode.nn import SparseLinear, autoformat, convert
from sparseode.nn.field import SparseMLPField
from sparseode.nn.folded import FoldedConcatLinear


_PRUNER = ["torch"]  # who prunes the models below: torch.nn.utils.prune directly, "sparseode" or "none"


def _prune(module: nn.Module, amount=0.8, skip=()):
    if _PRUNER[0] == "none":
        return module
    if _PRUNER[0] == "sparseode":  # sparseode.prune.apply: zeroes weight_orig where it prunes
        return so.prune.apply(module, "magnitude", amount, scope="layer",
                              filter_fn=lambda name, layer: not name.endswith(skip))
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear) and not name.endswith(skip):
            prune.random_unstructured(layer, "weight", amount=amount)
    return module


def _sequential():
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4),
                      nn.Tanh(), nn.Linear(4, 4))
    _prune(m[0]), _prune(m[2])
    with torch.no_grad():  # unpruned but zero-heavy: converted by max_density, no mask to restore
        m[4].weight[torch.rand(4, 16) < 0.8] = 0
    return m  # m[6] unpruned and dense: left alone


def _field(time):
    # the first layer stays unpruned (dense, kept as it is), the others pruned; gates pruned too
    return _prune(MLPVectorField(3, (16, 16), time=time), skip=("layers.0", "layers.0.linear"))


def _classifier():
    clf = ODEClassifier(5, (16, 16), 3, time="concat", embed_dim=4, augment=1, rtol=1e-4, atol=1e-4)
    _prune(clf.field), _prune(clf.embed)
    return clf


MODELS = {
    "sequential": _sequential,
    "field-autonomous": lambda: _field(None),
    "field-concat": lambda: _field("concat"),
    "field-concatsquash": lambda: _field("concatsquash"),
    "cnf": lambda: CNF(_prune(MLPVectorField(2, (16, 16), time="concat")), rtol=1e-4, atol=1e-4),
    "cnf-stacked": lambda: CNF([_field("concat"), _field("concatsquash")], rtol=1e-4, atol=1e-4),
    "neural-ode": lambda: NeuralODE(_field("concatsquash"), rtol=1e-4, atol=1e-4),
    "classifier": _classifier,
    "unpruned-field": lambda: MLPVectorField(3, (16,), time="concat"),
}


def _build(kind, seed=0, pruner="torch"):
    torch.manual_seed(seed)
    _PRUNER[0] = pruner
    try:
        return MODELS[kind]()
    finally:
        _PRUNER[0] = "torch"


def _outputs(model, seed=1):
    """What the model computes on a fixed input: (t, x) for fields, x for the rest."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(model, nn.Sequential):
            return model(torch.randn(7, 6, generator=gen))
        if isinstance(model, (MLPVectorField, SparseMLPField)):
            return model(torch.tensor(0.3), torch.randn(7, 3, generator=gen))
        if isinstance(model, CNF):
            return model.log_prob(torch.randn(7, model.dim, generator=gen))
        if isinstance(model, NeuralODE):
            return model(torch.randn(7, 3, generator=gen))
        return model(torch.randn(7, 5, generator=gen))


def _computed_state(model):
    """The state dict with every ``*_orig`` as the model computes with it (``orig * mask``)."""
    state = model.state_dict()
    return {k: v * state[k[: -len("_orig")] + "_mask"] if k.endswith("_orig") else v for k, v in state.items()}


def _snapshot(model):
    return [(k, v.clone()) for k, v in model.state_dict().items()], [type(m) for m in model.modules()]


def _assert_same_state(got, want):
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _sparsity(model):
    """Share of zeros among every weight the model multiplies by (biases excluded)."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight_orig * module.weight_mask if hasattr(module, "weight_mask") else module.weight
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total


KINDS = sorted(MODELS)
FORMATS = ("csr", "bsr", "masked")


def _sparsify(model, fmt, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BSR on these small random masks warns (tested below)
        return so.sparsify(model, format=fmt, block=(4, 4), **kwargs)


# --- copies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sparsify_and_densify_return_copies_and_leave_the_argument_untouched(kind):
    model = _build(kind)
    _outputs_with_grad(model, 0)  # a grad-mode call leaves pruned layers a non-leaf .weight attribute
    before = _snapshot(model)
    sparse = _sparsify(model, "csr")
    assert sparse is not model
    after = _snapshot(model)
    assert [k for k, _ in after[0]] == [k for k, _ in before[0]] and after[1] == before[1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after[0], before[0]))
    sparse_before = _snapshot(sparse)
    dense = so.densify(sparse)
    assert dense is not sparse and _snapshot(sparse)[1] == sparse_before[1]
    if kind != "unpruned-field":
        assert any(isinstance(m, SparseLinear) for m in sparse.modules())
    # shared parameters would make training one model change the other
    ids = {id(p) for p in model.parameters()}
    assert not ids & {id(p) for p in sparse.parameters()} and not ids & {id(p) for p in dense.parameters()}


def test_copy_works_after_a_grad_mode_call_of_a_pruned_model():
    model = _build("sequential")
    model(torch.randn(2, 6)).sum().backward()  # leaves weight = weight_orig * mask with a graph
    sparse = so.sparsify(model, format="csr")
    torch.testing.assert_close(_outputs(sparse), _outputs(model))


def test_inplace_converts_the_argument():
    model = _build("sequential")
    assert so.sparsify(model, format="csr", inplace=True) is model
    assert isinstance(model[0], SparseLinear)
    assert so.densify(model, inplace=True) is model
    assert type(model[0]) is nn.Linear and hasattr(model[0], "weight_mask")
    field = _build("field-concat")
    sparse = so.sparsify(field, format="csr", inplace=True)  # a new top module, the layers moved over
    assert isinstance(sparse, SparseMLPField) and sparse.layers is field.layers


def test_conversion_leaves_the_random_stream_alone(measured):
    model = _build("cnf-stacked")
    state = torch.get_rng_state()
    so.densify(so.sparsify(model, format="csr"))
    so.nn.plan_formats(model, format="auto")  # times on random inputs
    assert measured and torch.equal(torch.get_rng_state(), state)


# --- lossless round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_densify_of_sparsify_gives_back_the_model(kind, fmt):
    model = _build(kind)
    back = so.densify(_sparsify(model, fmt))
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    # same keys in the same order (weight_orig/weight_mask where the model had them), same values
    # of everything the model computes with
    _assert_same_state(_computed_state(back), _computed_state(model))
    # weight_orig as it was (layers left dense), or zero where pruned (a sparse layer keeps no
    # pruned value)
    for key, value in back.state_dict().items():
        if key.endswith("_orig"):
            was = model.state_dict()[key]
            assert torch.equal(value, was) or torch.equal(value, _computed_state(model)[key]), key
    torch.testing.assert_close(_outputs(back), _outputs(model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_of_a_model_pruned_by_sparseode_is_exact_in_every_value(kind, fmt):
    """sparseode.prune.apply leaves zeros in weight_orig where it prunes, training with a fresh
    optimiser and rewinding to the weights from before pruning keep them, so densify(sparsify(m)) equals m entry for entry (a model
    pruned by torch.nn.utils.prune directly comes back with zeros there: the test above)."""
    from sparseode.prune.rewind import rewind_to, snapshot_weights

    model = _build(kind, pruner="sparseode")
    _assert_same_state(so.densify(_sparsify(model, fmt)).state_dict(), model.state_dict())
    init = snapshot_weights(_build(kind, pruner="none"))  # the same model before pruning (magnitude draws nothing)
    for step in range(2):  # a fresh AdamW (decoupled weight decay), then a rewind to the start
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        opt.zero_grad()
        _outputs_with_grad(model, step).pow(2).mean().backward()
        opt.step()
    rewind_to(model, init)
    opt.step()  # stale Adam moments of a step taken before the rewind: pruned entries get no gradient
    state = model.state_dict()
    if kind != "unpruned-field":
        assert any(k.endswith("_orig") for k in state) and _sparsity(model) > 0.3
    back = so.densify(_sparsify(model, fmt))
    _assert_same_state(back.state_dict(), state)
    torch.testing.assert_close(_outputs(back), _outputs(model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_trains_like_the_model_and_stays_at_its_sparsity(kind):
    model = _build(kind)
    back = so.densify(_sparsify(model, "csr"))
    masks = {k: v.clone() for k, v in back.state_dict().items() if k.endswith("_mask")}
    for m in (model, back):  # the same steps on both
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for step in range(3):
            opt.zero_grad()
            _outputs_with_grad(m, step).pow(2).mean().backward()
            opt.step()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in masks.items())
    for name, module in back.named_modules():  # no pruned weight revived
        if hasattr(module, "weight_mask"):
            assert not (module.weight_orig * module.weight_mask)[module.weight_mask == 0].any(), name
    assert _sparsity(back) == _sparsity(model)
    if kind != "unpruned-field":
        assert _sparsity(back) > 0.3
    got, want = _computed_state(back), _computed_state(model)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def _outputs_with_grad(model, seed):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, nn.Sequential):
        return model(torch.randn(7, 6, generator=gen))
    if isinstance(model, MLPVectorField):
        return model(torch.tensor(0.3), torch.randn(7, 3, generator=gen))
    if isinstance(model, CNF):
        return model.log_prob(torch.randn(7, model.dim, generator=gen))
    if isinstance(model, NeuralODE):
        return model(torch.randn(7, 3, generator=gen))
    return model(torch.randn(7, 5, generator=gen))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_save_of_sparsified_models_and_of_their_state_dicts(kind):
    model = _build(kind)
    sparse = _sparsify(model, "csr")
    want = _outputs(sparse)
    torch.testing.assert_close(want, _outputs(model), rtol=1e-5, atol=1e-6)
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    torch.testing.assert_close(_outputs(whole), want, rtol=0, atol=0)
    _assert_same_state(_computed_state(so.densify(whole)), _computed_state(model))
    # the state dict alone (tensors only) loads into the sparsified model of another draw
    buf = io.BytesIO()
    torch.save(sparse.state_dict(), buf)
    buf.seek(0)
    other = _sparsify(_build(kind, seed=5), "csr")
    other.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(_outputs(other), want, rtol=0, atol=0)
    _assert_same_state(_computed_state(so.densify(other)), _computed_state(model))


def test_folded_concat_layers_remember_their_prune_mask():
    field = _build("field-concat")
    sparse = so.sparsify(field, format="csr")
    folded = [m for m in sparse.modules() if isinstance(m, FoldedConcatLinear)]
    assert len(folded) == 2 and all(m.inner.from_pruned for m in folded)
    back = so.densify(sparse)
    assert "layers.1.linear.weight_orig" in back.state_dict() and "layers.1.linear.weight" not in back.state_dict()


# --- formats -----------------------------------------------------------------------------------
def _pruned_256(granularity):
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    if granularity == "weight":
        prune.l1_unstructured(lin, "weight", amount=0.9)
    else:  # whole 16x16 blocks, 90% of them pruned
        keep = (torch.rand(16, 16) < 0.1).repeat_interleave(16, 0).repeat_interleave(16, 1)
        prune.custom_from_mask(lin, "weight", keep)
    return nn.Sequential(lin)


def test_bsr_on_a_mask_with_mostly_empty_blocks_warns_with_the_stored_share():
    model = _pruned_256("weight")
    with pytest.warns(UserWarning, match=r"stores 65536 values for 6554 kept weights \(10% of the stored"):
        sparse = so.sparsify(model, format="bsr")
    assert sparse[0].sparse.stored() == 65536
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full blocks: no warning
        so.sparsify(_pruned_256("block"), format="bsr")


def test_bsr_storage_counts_whole_blocks():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 0] = mask[5, 2] = mask[4, 4] = mask[7, 7] = True  # blocks (0, 0), (1, 0), (1, 1)
    assert autoformat.bsr_storage(mask, (4, 4)) == (3 * 16, 4)
    assert autoformat.block_occupancy(mask, (4, 4)) == pytest.approx(4 / 48)
    assert autoformat.block_occupancy(torch.zeros(8, 8, dtype=torch.bool), (4, 4)) == 1.0


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """An empty format cache and timings where each candidate beats the ones timed before it
    (dense, then CSR, then BSR where it is a candidate); returns the list of timed calls."""
    monkeypatch.setenv("SPARSEODE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autoformat, "_MEMORY", {})
    calls = []

    def fake_time(fn, reps=7):
        calls.append(fn)
        return 1000.0 - len(calls)

    monkeypatch.setattr(autoformat, "_best_time", fake_time)
    return calls


def test_auto_never_picks_bsr_for_mostly_empty_blocks(measured):
    assert so.nn.plan_formats(_pruned_256("weight"), format="auto") == {"0": "csr"}
    assert so.nn.plan_formats(_pruned_256("block"), format="auto") == {"0": "bsr"}


def test_auto_cache_tells_an_unstructured_mask_from_a_block_mask_of_the_same_density(measured):
    weight = torch.randn(64, 64)
    blocks = torch.zeros(4, 4, dtype=torch.bool)
    blocks[torch.arange(4), torch.randperm(4)] = True  # 4 of 16 full 16x16 blocks: density 0.25
    blocks = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    unstructured = torch.zeros(64 * 64, dtype=torch.bool)
    unstructured[torch.randperm(64 * 64)[:1024]] = True  # density 0.25 too, spread over every block
    unstructured = unstructured.reshape(64, 64)
    assert blocks.float().mean() == unstructured.float().mean() == 0.25
    assert autoformat.choose_format(weight, blocks, batch=8) == "bsr"
    n = len(measured)
    assert autoformat.choose_format(weight, unstructured, batch=8) == "csr"  # measured again, not the cache
    assert len(measured) > n
    n = len(measured)
    assert autoformat.choose_format(weight, blocks, batch=8) == "bsr" and len(measured) == n  # cached


def test_a_plan_computed_once_builds_the_same_model_everywhere(monkeypatch):
    model = _build("cnf-stacked")
    choices = iter(["csr", "dense", "bsr", "csr", "masked", "dense"] * 2)
    monkeypatch.setattr(convert, "choose_format", lambda *a, **k: next(choices))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake choice puts BSR on mostly empty blocks
        plan = so.nn.plan_formats(model, block=(4, 4))
    assert plan == {"fields.0.layers.1.linear": "csr", "fields.0.layers.2.linear": "dense",
                    "fields.1.layers.1.linear": "bsr", "fields.1.layers.2.linear": "csr"}
    monkeypatch.setattr(convert, "choose_format", lambda *a, **k: pytest.fail("measured despite a plan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = so.sparsify(model, block=(4, 4), formats=plan)
    layers = dict(sparse.named_modules())
    assert layers["fields.0.layers.1.inner"].format == "csr"
    assert type(layers["fields.0.layers.2"]).__name__ == "ConcatLinear"
    assert layers["fields.1.layers.1.linear"].format == "bsr"
    assert layers["fields.1.layers.2.linear"].format == "csr"
    torch.testing.assert_close(_outputs(sparse), _outputs(model), rtol=1e-5, atol=1e-6)


def test_formats_fix_the_layers_they_name_and_are_checked():
    model = _build("sequential")
    sparse = so.sparsify(model, format="csr", formats={"0": "masked", "6": "csr", "2": "dense"})
    assert sparse[0].format == "masked" and sparse[6].format == "csr"  # "6" is dense, converted as asked
    assert type(sparse[2]) is nn.Linear and sparse[4].format == "csr"
    with pytest.raises(ValueError, match=r"formats names layers the model does not have: \['7'\]"):
        so.sparsify(model, formats={"7": "csr"})
    with pytest.raises(ValueError, match=r"formats\['0'\] must be one of dense, masked, csr, bsr"):
        so.sparsify(model, formats={"0": "auto"})
    with pytest.raises(ValueError, match="max_density must be a number"):
        so.sparsify(model, max_density="0.5")
