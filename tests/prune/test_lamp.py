"""LAMP scores, per-layer minimum density and dense layers, against hand computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparseode as so
from sparseode.prune.importance import lamp_scores


def two_layers(a=(0.1, 0.2, 0.3), b=(1.0, 2.0, 3.0, 4.0)) -> nn.Sequential:
    """Layer "0": weight (1, 3) = a; layer "1": weight (1, 4) = b (float64, not chained)."""
    model = nn.Sequential(nn.Linear(3, 1), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([a]))
        model[1].weight.copy_(torch.tensor([b]))
    return model


def kept(model, i):
    return model[i].weight_mask.reshape(-1).bool().tolist() if hasattr(model[i], "weight_mask") else None


def test_lamp_scores_by_hand():
    # w² = 1, 4, 9: the sums over entries at least as large are 14, 13, 9
    got = lamp_scores(torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[1 / 14, 4 / 13, 1.0]], dtype=torch.float64))
    # equal magnitudes share one score: 0.25 / (0.25 + 0.25 + 4); a zero scores 0
    got = lamp_scores(torch.tensor([[0.5, -0.5], [2.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[1 / 18, 1 / 18], [1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(lamp_scores(torch.zeros(2, 3)), torch.zeros(2, 3))
    assert lamp_scores(torch.ones(2, 2, dtype=torch.float32)).dtype == torch.float32


def test_lamp_is_a_registered_measure_of_every_parameter():
    model = two_layers()
    scores = so.prune.importance(model, "lamp")
    assert "lamp" in so.prune.MEASURES and set(scores) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    # layer 1: w² = 1, 4, 9, 16, suffix sums 30, 29, 25, 16
    torch.testing.assert_close(scores["1.weight"], torch.tensor([[1 / 30, 4 / 29, 9 / 25, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[1 / 14, 4 / 13, 1.0]], dtype=torch.float64))


def test_global_lamp_spares_the_small_layer_that_global_magnitude_empties():
    mag = so.prune.apply(two_layers(), "magnitude", 3 / 7)
    assert kept(mag, 0) == [False, False, False]  # every weight of layer 0 is below layer 1's
    lamp = so.prune.apply(two_layers(), "lamp", 3 / 7)
    # lowest LAMP scores: 1/30 (layer 1), 1/14 (layer 0), 4/29 (layer 1)
    assert kept(lamp, 0) == [False, True, True]
    assert kept(lamp, 1) == [False, False, True, True]


def test_lamp_on_a_pruned_model_scores_pruned_entries_zero_and_composes():
    model = so.prune.apply(two_layers(), "lamp", 3 / 7)
    scores = so.prune.importance(model, "lamp")
    torch.testing.assert_close(scores["1.weight"], torch.tensor([[0.0, 0.0, 9 / 25, 1.0]], dtype=torch.float64))
    so.prune.apply(model, scores, 5 / 7)  # next lowest: 4/13 in layer 0 and 9/25 in layer 1
    assert kept(model, 0) == [False, False, True] and kept(model, 1) == [False, False, False, True]


def test_min_density_keeps_the_best_units_of_every_layer_and_takes_the_rest_elsewhere():
    model = so.prune.apply(two_layers(), "magnitude", 3 / 7, min_density=0.5)
    # layer 0 keeps ceil(1.5) = 2 (0.2, 0.3); layer 1 keeps 2 (3, 4); 3 removed: 0.1, 1, 2
    assert kept(model, 0) == [False, True, True] and kept(model, 1) == [False, False, True, True]
    assert float(so.prune.sparsity(model)) == pytest.approx(3 / 7)
    one = so.prune.apply(two_layers(), "magnitude", 3 / 7, min_density={"0": 1.0})
    assert kept(one, 0) == [True, True, True] and kept(one, 1) == [False, False, False, True]


def test_min_density_per_layer_scope_stops_a_layer_at_its_floor():
    model = so.prune.apply(two_layers(), "magnitude", 0.75, scope="layer", min_density=0.5)
    # layer 0: round(0.75·3) = 2 asked, 3 - 2 = 1 allowed; layer 1: 3 asked, 2 allowed
    assert kept(model, 0) == [False, True, True] and kept(model, 1) == [False, False, True, True]


def test_min_density_that_makes_the_target_unreachable_is_an_error():
    with pytest.raises(ValueError, match=r"min_density.*at most sparsity 0\.4286"):
        so.prune.apply(two_layers(), "magnitude", 0.9, min_density=0.5)


def test_min_density_never_revives_pruned_units():
    model = so.prune.apply(two_layers(), "magnitude", 3 / 7)  # layer 0 emptied
    so.prune.apply(model, "magnitude", 3 / 7, min_density=0.5)
    assert kept(model, 0) == [False, False, False] and kept(model, 1) == [True] * 4


def test_keep_dense_layers_get_no_mask_and_count_in_the_global_total():
    for keep in (["0"], lambda name, m: m.in_features == 3):
        model = so.prune.apply(two_layers(), "magnitude", 3 / 7, keep_dense=keep)
        assert kept(model, 0) is None and not hasattr(model[0], "weight_orig")
        assert kept(model, 1) == [False, False, False, True]
        rep = so.prune.sparsity(model)
        assert rep["0"] == 0.0 and rep.total == pytest.approx(3 / 7)
    # scores are not needed for a dense layer
    scores = {"1.weight": torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)}
    model = so.prune.apply(two_layers(), scores, 2 / 7, keep_dense=["0"])
    assert kept(model, 1) == [True, True, False, False]


def test_keep_dense_with_layer_scope_prunes_only_the_others():
    model = so.prune.apply(two_layers(), "magnitude", 0.4, scope="layer", keep_dense=["1"])
    assert kept(model, 1) is None and kept(model, 0) == [False, True, True]  # round(0.4·3) = 1


@pytest.mark.parametrize("kw, exc, name", [
    ({"keep_dense": "0"}, TypeError, "keep_dense"), ({"keep_dense": ["5"]}, ValueError, "keep_dense"),
    ({"min_density": {"x": 0.5}}, ValueError, "min_density"), ({"min_density": 1.5}, ValueError, "min_density"),
    ({"min_density": "0.5"}, TypeError, "min_density"), ({"min_density": {"0": True}}, TypeError, r"min_density\['0'\]"),
    ({"min_density": 0.5, "granularity": "neuron"}, ValueError, "min_density"),
])
def test_bad_floors_name_the_argument(kw, exc, name):
    model = two_layers()
    with pytest.raises(exc, match=name):
        so.prune.apply(model, "magnitude", 0.5, **kw)
    assert kept(model, 0) is None and kept(model, 1) is None  # nothing pruned
