"""apply / sparsity / remove: exact counts, granularities, scopes, composition, torch layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

import sparseode as so
from prune_helpers import batches, mlp, mse


def _weights(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _rand_scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{n}.weight": torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
            for n, m in _weights(model).items()}


def test_torch_layout_and_forward_uses_mask():
    model = mlp((3, 8, 8, 2))
    so.prune.apply(model, "magnitude", 0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    for n, m in _weights(model).items():
        names = dict(m.named_parameters(recurse=False))
        assert "weight_orig" in names and "weight" not in names
        assert "weight_mask" in dict(m.named_buffers(recurse=False))
        assert any(isinstance(h, torch_prune.BasePruningMethod) for h in m._forward_pre_hooks.values())
    # independent forward with the masked weights as plain tensors
    h = x
    for i, m in enumerate([model[0], model[2], model[4]]):
        h = h @ (m.weight_orig * m.weight_mask).T + m.bias
        if i < 2:
            h = torch.tanh(h)
    torch.testing.assert_close(model(x), h)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77, 0.95])
def test_global_weight_exact_and_lowest(s):
    model = mlp((3, 8, 8, 2))
    scores = _rand_scores(model)
    so.prune.apply(model, scores, s, scope="global")
    allsc = torch.cat([scores[f"{i}.weight"].reshape(-1) for i in (0, 2, 4)])
    k = round(s * allsc.numel())
    removed = torch.cat([(model[i].weight_mask == 0).reshape(-1) for i in (0, 2, 4)])
    assert int(removed.sum()) == k
    if k:  # every removed score is below every kept one
        assert allsc[removed].max() < allsc[~removed].min()
    assert so.prune.sparsity(model).pruned == k


def test_layer_scope_exact_per_layer():
    model = mlp((3, 8, 8, 2))
    scores = _rand_scores(model)
    so.prune.apply(model, scores, 0.4, scope="layer")
    rep = so.prune.sparsity(model)
    for n, m in _weights(model).items():
        k = round(0.4 * m.weight_mask.numel())
        assert rep.layers[n].pruned == k
        sc = scores[f"{n}.weight"]
        assert sc[m.weight_mask == 0].max() < sc[m.weight_mask == 1].min()


def test_ties_are_deterministic_by_position():
    model = mlp((3, 4, 2))
    scores = {k: torch.zeros_like(v) for k, v in _rand_scores(model).items()}
    so.prune.apply(model, scores, 0.25, scope="global")
    removed = torch.cat([(model[i].weight_mask == 0).reshape(-1) for i in (0, 2)])
    k = round(0.25 * removed.numel())
    assert removed[:k].all() and not removed[k:].any()


def test_masks_compose_never_revive():
    model = mlp((3, 8, 8, 2))
    so.prune.apply(model, _rand_scores(model, 0), 0.5)
    m1 = {n: m.weight_mask.clone() for n, m in _weights(model).items()}
    so.prune.apply(model, _rand_scores(model, 1), 0.7)  # other scores: still a superset
    m2 = {n: m.weight_mask.clone() for n, m in _weights(model).items()}
    for n in m1:
        assert (m2[n] <= m1[n]).all()
    assert so.prune.sparsity(model).pruned == round(0.7 * so.prune.sparsity(model).numel)
    so.prune.apply(model, _rand_scores(model, 2), 0.3)  # lower sparsity: nothing changes
    for n, m in _weights(model).items():
        assert torch.equal(m.weight_mask, m2[n])


def test_understands_torch_pruned_models():
    model = mlp((3, 8, 8, 2))
    torch_prune.l1_unstructured(model[2], "weight", amount=0.5)
    rep = so.prune.sparsity(model)
    assert rep.layers["2"].pruned == 32 and rep.layers["0"].pruned == 0
    before = model[2].weight_mask.clone()
    so.prune.apply(model, "magnitude", 0.6)
    assert (model[2].weight_mask <= before).all()
    assert so.prune.sparsity(model).pruned == round(0.6 * so.prune.sparsity(model).numel)
    # and torch can remove what we installed
    torch_prune.remove(model[0], "weight")
    assert isinstance(model[0].weight, nn.Parameter)


def test_neuron_mlp():
    model = mlp((3, 10, 10, 10, 2))
    scores = _rand_scores(model)
    so.prune.apply(model, scores, 0.3, granularity="neuron")
    lins = [model[0], model[2], model[4], model[6]]
    for i, m in enumerate(lins[:-1]):
        rows = (m.weight_mask == 0).all(dim=1)
        assert int(rows.sum()) == 3  # round(0.3 * 10) in every layer
        unit = scores[f"{2 * i}.weight"].sum(dim=1).abs()
        assert unit[rows].max() < unit[~rows].min()
        nxt = lins[i + 1].weight_mask
        assert (nxt[:, rows] == 0).all()  # carried into the next layer's inputs
    assert not (lins[-1].weight_mask == 0).all(dim=1).any()  # last layer's outputs never pruned
    # pruned units really are removed: perturbing their incoming weights changes nothing
    x = torch.randn(5, 3, dtype=torch.float64)
    y = model(x)
    with torch.no_grad():
        model[0].bias.add_(torch.randn(10, dtype=torch.float64) * ((model[0].weight_mask == 0).all(1)))
    torch.testing.assert_close(model(x), y)


@pytest.mark.parametrize("time", [None, "concat", "concatsquash"])
def test_neuron_on_vector_field(time):
    models = pytest.importorskip("sparseode.models")
    f = models.MLPVectorField(dim=2, hidden=(8, 8), time=time, activation="sigmoid")
    so.prune.apply(f, "magnitude", 0.5, granularity="neuron")
    lins = [l if isinstance(l, nn.Linear) else l.linear for l in f.layers]
    for a, b in zip(lins[:-1], lins[1:]):
        rows = (a.weight_mask == 0).all(dim=1)
        assert int(rows.sum()) == 4
        cols = (b.weight_mask == 0).all(dim=0)
        assert torch.equal(cols[: a.out_features], rows)
        assert not cols[a.out_features:].any()  # the time column is never pruned
    assert not (lins[-1].weight_mask == 0).all(dim=1).any()
    x = torch.randn(6, 2)
    y = f(0.3, x)
    with torch.no_grad():  # a pruned unit's bias no longer matters
        r = (lins[0].weight_mask == 0).all(1)
        lins[0].bias.add_(5.0 * r)
    torch.testing.assert_close(f(0.3, x), y)


def test_block_granularity():
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8)).double()
    scores = _rand_scores(model)
    so.prune.apply(model, scores, 0.5, granularity="block", block=(4, 2))
    blocks, removed = [], []
    for n, m in _weights(model).items():
        o, i = m.weight.shape
        mk = m.weight_mask.reshape(o // 4, 4, i // 2, 2)
        assert ((mk.amin(dim=(1, 3)) == mk.amax(dim=(1, 3)))).all()  # each block all-0 or all-1
        removed.append((mk.amax(dim=(1, 3)) == 0).reshape(-1))
        blocks.append(scores[f"{n}.weight"].reshape(o // 4, 4, i // 2, 2).sum(dim=(1, 3)).reshape(-1))
    removed, blocks = torch.cat(removed), torch.cat(blocks)
    assert int(removed.sum()) == round(0.5 * removed.numel())
    assert blocks[removed].max() < blocks[~removed].min()
    assert so.prune.sparsity(model).total == pytest.approx(0.5)


def test_block_must_tile_and_filter_fn_excludes():
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"block=\(8, 8\) does not tile layer '0'"):
        so.prune.apply(model, "magnitude", 0.5, granularity="block", block=8)
    so.prune.apply(model, "magnitude", 0.5, granularity="block", block=8,
                   filter_fn=lambda n, m: m.in_features % 8 == 0 and m.out_features % 8 == 0)
    rep = so.prune.sparsity(model)
    assert rep["2"] == 0.5 and rep["0"] == 0 and rep["4"] == 0
    assert not hasattr(model[0], "weight_mask")


def test_bad_arguments():
    model = mlp()
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            so.prune.apply(model, "magnitude", bad)
    with pytest.raises(ValueError, match="granularity"):
        so.prune.apply(model, "magnitude", 0.5, granularity="channel")
    with pytest.raises(ValueError, match="scope"):
        so.prune.apply(model, "magnitude", 0.5, scope="model")
    with pytest.raises(ValueError, match="scope"):
        so.prune.apply(model, "magnitude", 0.5, granularity="neuron", scope="global")
    with pytest.raises(ValueError, match="block"):
        so.prune.apply(model, "magnitude", 0.5, granularity="block", block=(0, 2))
    with pytest.raises(KeyError, match="scores"):
        so.prune.apply(model, {"0.weight": torch.ones(4, 3)}, 0.5)
    with pytest.raises(ValueError, match="method"):
        so.prune.apply(model, "obd", 0.5)


def test_remove_bakes_masks_and_keeps_function():
    model = mlp((3, 8, 8, 2))
    so.prune.apply(model, "magnitude", 0.6)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = model(x)
    rep = so.prune.sparsity(model)
    so.prune.remove(model)
    assert not so.prune.masks(model)
    assert isinstance(model[0].weight, nn.Parameter)
    torch.testing.assert_close(model(x), y)
    assert so.prune.sparsity(model).pruned == rep.pruned


def test_load_pruned_roundtrip():
    model = mlp((3, 8, 8, 2))
    so.prune.apply(model, "random", 0.5)
    sd = model.state_dict()
    fresh = mlp((3, 8, 8, 2))
    so.prune.load_pruned(fresh, sd)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), model(x))
    assert so.prune.sparsity(fresh).pruned == so.prune.sparsity(model).pruned


def test_sparsity_report_text():
    model = mlp((3, 8, 2))
    so.prune.apply(model, "magnitude", 0.5, scope="layer")
    rep = so.prune.sparsity(model)
    assert float(rep) == pytest.approx(rep.pruned / rep.numel)
    assert "total" in str(rep) and "0.5000" in str(rep)


def test_pruned_gradients_are_zero_and_adamw_never_revives():
    model = mlp((3, 8, 8, 2))
    so.prune.apply(model, "random", 0.6)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    data = batches(4)
    for b in data * 5:
        opt.zero_grad()
        mse(model, b).backward()
        for m in _weights(model).values():
            assert (m.weight_orig.grad[m.weight_mask == 0] == 0).all()
        opt.step()
    for m in _weights(model).values():
        model(data[0][0])
        assert (m.weight[m.weight_mask == 0] == 0).all()
