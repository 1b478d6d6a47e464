"""neuron_density / neuron_schedule: weight densities of neuron pruning from shapes alone, checked
against the masks so.prune.apply actually sets, and the unit keep ratios reaching weight densities."""
import pytest
import torch

import sparseode as so
from sparseode.models import CNF, MLPVectorField
from sparseode.prune.neuron_schedule import neuron_density, neuron_schedule


def applied_density(model, unit_keep):
    """Weight density from the masks of a real neuron pruning (an independent count)."""
    m = so.prune.clone(model)
    so.prune.apply(m, so.prune.importance(m, method="magnitude"), 1 - unit_keep, granularity="neuron")
    return 1 - float(so.prune.sparsity(m))


FIELDS = {
    "demo 2->64x3": lambda: MLPVectorField(2, (64, 64, 64), activation="tanh"),
    "concat time 3->(17, 9, 30)": lambda: MLPVectorField(3, (17, 9, 30), time="concat"),
    "concatsquash 5->(12, 7)": lambda: MLPVectorField(5, (12, 7), time="concatsquash"),
    "one hidden 4->10": lambda: MLPVectorField(4, (10,)),
}


@pytest.mark.parametrize("name", list(FIELDS))
@pytest.mark.parametrize("unit_keep", [1.0, 0.77, 0.5, 0.31, 0.125, 0.05])
def test_density_matches_the_masks_apply_sets(name, unit_keep):
    torch.manual_seed(0)
    model = CNF(FIELDS[name]())
    assert neuron_density(model, unit_keep) == pytest.approx(applied_density(model, unit_keep), abs=1e-12)


def test_density_by_hand_for_the_demo_field():
    # 2 -> u -> u -> u -> 2 with u kept units: 2u + u^2 + u^2 + 2u weights of 4*64 + 2*64^2 = 8448
    model = CNF(MLPVectorField(2, (64, 64, 64)))
    for u in (64, 45, 20, 8, 1):
        assert neuron_density(model, u / 64) == pytest.approx((4 * u + 2 * u * u) / 8448)


def test_schedule_picks_the_unit_counts_nearest_each_weight_keep():
    model = CNF(MLPVectorField(2, (64, 64, 64)))
    units = [round(q * 64) for q in neuron_schedule(model, (0.5, 0.25, 0.1, 0.05, 0.02))]
    assert units == [45, 32, 20, 14, 8]
    for k, u in zip((0.5, 0.25, 0.1, 0.05, 0.02), units):  # no other unit count is nearer
        d = (4 * u + 2 * u * u) / 8448
        assert all(abs(d - k) <= abs((4 * v + 2 * v * v) / 8448 - k) for v in range(1, 65))


def test_schedule_reaches_its_densities_in_a_real_cascade():
    torch.manual_seed(1)
    model = CNF(MLPVectorField(2, (32, 32)))
    keeps = (0.4, 0.1)
    hist = so.prune.iterative(model, lambda m, **kw: None, schedule=neuron_schedule(model, keeps),
                              method="magnitude", granularity="neuron", sparse=False, progress=False)
    got = [1 - r.sparsity for r in hist.rounds]
    assert got == pytest.approx(keeps, abs=0.03)
    assert got == pytest.approx([neuron_density(model, q) for q in neuron_schedule(model, keeps)])


@pytest.mark.parametrize("keeps, match", [((0.5, 0.6), "non-increasing"), ((0.0,), r"\(0, 1\]"),
                                          ((float("nan"),), r"\(0, 1\]"), ((1.5,), r"\(0, 1\]"),
                                          ((), r"\(0, 1\]"), ((0.5, 0.49), "same units")])
def test_schedule_refuses_bad_keeps(keeps, match):
    with pytest.raises(ValueError, match=match):
        neuron_schedule(CNF(MLPVectorField(2, (4, 4))), keeps)


def test_schedule_needs_neuron_chains():
    with pytest.raises(ValueError, match="no neuron chains"):
        neuron_schedule(torch.nn.Linear(3, 3), (0.5,))
    with pytest.raises(ValueError, match="no prunable"):
        neuron_density(torch.nn.Tanh(), 0.5)
