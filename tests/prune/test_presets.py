"""The Sparse Flows schedule presets of iterative (keep ratios against their definitions)."""
from __future__ import annotations

import math

import pytest

import sparseode as so
from sparseode.prune.presets import PRESETS, preset
from prune_helpers import mlp


def _ratios(keep):
    return [b / a for a, b in zip(keep, keep[1:])]


def test_sparse_flows_preset_is_the_papers_toy_cascade():
    keep = preset("sparse_flows")
    assert len(keep) == 29
    # geometric 0.80 -> 0.20 in 20 steps: constant factor (0.25)^(1/19), both ends included
    assert keep[0] == pytest.approx(0.80) and keep[19] == pytest.approx(0.20)
    for r in _ratios(keep[:20]):
        assert r == pytest.approx(0.25 ** (1 / 19), rel=1e-9)
    # then linear 0.18 -> 0.02 in 9 steps of 0.02
    assert keep[20:] == pytest.approx([0.18, 0.16, 0.14, 0.12, 0.10, 0.08, 0.06, 0.04, 0.02], abs=1e-12)
    assert keep == so.prune.default_schedule(0.98)


@pytest.mark.parametrize("name, n, first, last", [("sparse_flows_8", 8, 0.70, 0.10),
                                                   ("sparse_flows_12", 12, 0.80, 0.05)])
def test_tabular_presets_are_geometric(name, n, first, last):
    keep = preset(name)
    assert len(keep) == n and keep[0] == pytest.approx(first) and keep[-1] == pytest.approx(last)
    for r in _ratios(keep):
        assert r == pytest.approx((last / first) ** (1 / (n - 1)), rel=1e-9)


def test_preset_truncated_at_target():
    keep = preset("sparse_flows_8", 0.5)
    full = PRESETS["sparse_flows_8"]
    assert keep[:-1] == [k for k in full if k > 0.5]
    assert keep[-1] == pytest.approx(0.5)  # ends exactly at the target
    assert preset("sparse_flows_8", 1 - full[3]) == list(full[:4])  # on the grid: nothing appended


def test_bad_preset_and_target_errors_name_them():
    with pytest.raises(ValueError, match=r"schedule='sparse_flow'.*'sparse_flows', 'sparse_flows_12', 'sparse_flows_8'"):
        preset("sparse_flow")
    with pytest.raises(ValueError, match=r"target=0.98 lies beyond schedule='sparse_flows_8'.*0.9"):
        preset("sparse_flows_8", 0.98)
    fit = lambda m, callbacks=(): None  # noqa: E731
    with pytest.raises(ValueError, match="not a preset"):
        so.prune.iterative(mlp(), fit, schedule="sparse", progress=False)
    with pytest.raises(ValueError, match="rounds=3 cannot be combined with schedule='sparse_flows_8'"):
        so.prune.iterative(mlp(), fit, schedule="sparse_flows_8", rounds=3, progress=False)
    with pytest.raises(ValueError, match="target"):
        so.prune.iterative(mlp(), fit, schedule="sparse_flows_8", target=0.95, progress=False)


def test_iterative_runs_a_preset_to_its_end():
    model = mlp((3, 32, 32, 2))
    seen = []

    def fit(m, callbacks=()):
        seen.append(so.prune.sparsity(m).total)

    hist = so.prune.iterative(model, fit, schedule="sparse_flows_8", progress=False)
    n = so.prune.sparsity(model).numel
    assert len(hist) == 8 and hist.rounds[-1].final
    for r, kr in zip(hist.rounds, PRESETS["sparse_flows_8"]):
        assert r.target_sparsity == pytest.approx(1 - kr)
        assert math.isclose(r.sparsity, round((1 - kr) * n) / n)
    assert seen == [r.sparsity for r in hist.rounds]
    h2 = so.prune.iterative(mlp((3, 32, 32, 2)), fit, schedule="sparse_flows", target=0.9, progress=False)
    assert len(h2) == 25 and h2.rounds[-1].target_sparsity == pytest.approx(0.9)
