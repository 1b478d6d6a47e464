"""sparseode.pruned, the one reader of the torch.nn.utils.prune layout, on layers torch itself pruned."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from sparseode import pruned


def _layer(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(5, 3).double()


def test_an_unpruned_layer():
    lin = _layer()
    assert not pruned.is_pruned(lin) and pruned.pruned_tensor_names(lin) == []
    assert pruned.mask(lin) is None and pruned.kept_mask(lin) is None
    assert pruned.effective(lin) is lin.weight and pruned.trainable(lin) is lin.weight
    assert torch.equal(pruned.mask_or_ones(lin), torch.ones(3, 5, dtype=torch.float64))
    assert pruned.logical_names(lin) == {"weight": "weight", "bias": "bias"}


def test_a_layer_pruned_by_torch():
    lin = _layer()
    torch_prune.random_unstructured(lin, "weight", amount=0.4)
    assert pruned.is_pruned(lin) and not pruned.is_pruned(lin, "bias")
    assert pruned.mask(lin) is lin.weight_mask  # the buffer itself
    kept = pruned.kept_mask(lin)
    assert kept.dtype == torch.bool and int((~kept).sum()) == 6 and torch.equal(kept, lin.weight_mask > 0)
    assert pruned.trainable(lin) is lin.weight_orig
    # effective is computed afresh: an update of weight_orig shows before the next forward call
    with torch.no_grad():
        lin.weight_orig.add_(1.0)
    assert not torch.equal(lin.weight, lin.weight_orig * lin.weight_mask)  # the attribute is stale
    assert torch.equal(pruned.effective(lin), lin.weight_orig * lin.weight_mask)
    assert pruned.effective(lin).requires_grad  # differentiable with respect to weight_orig


def test_twice_pruned_tensors_and_model_level_names():
    model = nn.Sequential(_layer(0), nn.Tanh(), _layer(1))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.2)
    torch_prune.l1_unstructured(model[0], "weight", amount=0.2)  # a PruningContainer now
    torch_prune.l1_unstructured(model[2], "bias", amount=1)
    assert pruned.pruned_tensor_names(model[0]) == ["weight"]
    assert sorted(pruned.masks(model)) == ["0.weight", "2.bias"]
    assert pruned.masks(model)["0.weight"] is model[0].weight_mask
    assert int((model[0].weight_mask == 0).sum()) == 5  # round(0.2·15) + round(0.2·12)
    names = pruned.logical_names(model)
    assert names == {"0.bias": "0.bias", "0.weight_orig": "0.weight", "2.weight": "2.weight",
                     "2.bias_orig": "2.bias"}


def test_a_look_alike_without_the_pruning_hook_is_not_pruned():
    lin = _layer()
    lin.register_buffer("weight_mask", torch.zeros(3, 5, dtype=torch.float64))
    lin.weight_orig = nn.Parameter(torch.ones(3, 5, dtype=torch.float64))
    assert not pruned.is_pruned(lin) and pruned.mask(lin) is None
    assert pruned.effective(lin) is lin.weight
    assert pruned.logical_names(lin)["weight_orig"] == "weight_orig"


def test_removed_pruning_leaves_a_plain_layer():
    lin = _layer()
    torch_prune.random_unstructured(lin, "weight", amount=0.4)
    torch_prune.remove(lin, "weight")
    assert not pruned.is_pruned(lin) and pruned.masks(lin) == {}
    assert int((pruned.effective(lin) == 0).sum()) == 6
