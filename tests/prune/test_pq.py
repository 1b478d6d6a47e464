"""PQ index and the SAP pruning ratio against hand computations; schedule="pq" in iterative."""
from __future__ import annotations

import math

import pytest
import torch

import sparseode as so
from sparseode.prune.pq import pq_index, pq_keep_ratio, pq_next_keep, pq_prune_count
from prune_helpers import mlp

# w = [4, 1, 1, (pruned 7), 2]: retained d = 4
W = torch.tensor([4.0, 1.0, 1.0, 7.0, 2.0])
M = torch.tensor([1, 1, 1, 0, 1])


def test_pq_index_by_hand():
    # p=0.5, q=1: ‖w‖_½ = (2 + 1 + 1 + √2)² = 29.313708…, ‖w‖_1 = 8, d^{1−2} = ¼
    assert pq_index(W, 0.5, 1.0, M) == pytest.approx(1 - 0.25 * (4 + math.sqrt(2)) ** 2 / 8, rel=1e-12)
    assert pq_index(W, 0.5, 1.0, M) == pytest.approx(0.0839466, abs=1e-7)
    # p=1, q=2: 1 − 4^{−½} · 8 / √22
    assert pq_index(W, 1.0, 2.0, M) == pytest.approx(1 - 0.5 * 8 / math.sqrt(22), rel=1e-12)
    # equal magnitudes: 0; one non-zero of d: the maximum 1 − d^{1/q − 1/p}
    assert pq_index(torch.tensor([-3.0, 3.0, 3.0]), 0.5, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert pq_index(torch.tensor([0.0, 0.0, 5.0, 0.0]), 0.5, 1.0) == pytest.approx(1 - 4 ** -1.0, rel=1e-12)


def test_sap_count_by_hand():
    # p=½, q=1, η_r=1: r = ⌈4 · 2^{−2} · (1 − I)^{1}⌉ = ⌈0.916…⌉ = 1, room 1 − 1/4 = 0.75
    assert pq_prune_count(W, M, eta_r=1.0, gamma=0.5)[:2] == (1, 4)   # ⌊4 · 0.375⌋
    assert pq_prune_count(W, M, eta_r=1.0, gamma=1.0)[0] == 3         # ⌊4 · 0.75⌋
    assert pq_prune_count(W, M, eta_r=1.0, gamma=1.0, beta=0.5)[0] == 2  # capped by β
    # η_r = 0: r = ⌈4 · 0.916⌉ = 4 → nothing to prune
    assert pq_prune_count(W, M)[0] == 0
    # p=1, q=2: r = ⌈4 (1 − I)²⌉ = ⌈4 · 64/88⌉ = 3 → ⌊4 · 0.25⌋ = 1
    assert pq_prune_count(W, M, p=1.0, q=2.0)[0] == 1
    assert pq_keep_ratio(W, M, p=1.0, q=2.0) == pytest.approx(0.75)


def test_pq_next_keep_pools_all_layers():
    torch.manual_seed(0)
    model = mlp((4, 8, 3))
    so.prune.apply(model, "magnitude", 0.25)
    ws = torch.cat([model[0].weight.reshape(-1), model[2].weight.reshape(-1)]).detach().double()
    ms = torch.cat([model[0].weight_mask.reshape(-1), model[2].weight_mask.reshape(-1)])
    v = ws[ms != 0].abs()
    d, D = v.numel(), ws.numel()
    p, q, eta, g = 0.5, 1.0, 0.5, 1.0
    i = 1 - d ** (1 / q - 1 / p) * float(v.sqrt().sum() ** 2) / float(v.sum())
    r = math.ceil(d * (1 + eta) ** (-q / (q - p)) * (1 - i) ** (q * p / (q - p)))
    c = math.floor(d * min(g * (1 - r / d), 0.9))
    assert c > 0
    assert pq_next_keep(model, eta_r=eta) == pytest.approx((d - c) / D, rel=1e-12)


def test_iterative_pq_schedule_reaches_target_adaptively():
    torch.manual_seed(0)
    model = mlp((4, 16, 16, 3))
    calls = []

    def fit(m, callbacks=()):
        calls.append(so.prune.sparsity(m).total)

    expected_first = 1 - pq_next_keep(so.prune.clone(model), eta_r=0.5)
    hist = so.prune.iterative(model, fit, target=0.8, schedule="pq", pq_params={"eta_r": 0.5}, progress=False)
    sp = [r.target_sparsity for r in hist.rounds]
    assert sp[0] == pytest.approx(expected_first)
    assert all(b > a for a, b in zip(sp, sp[1:]))            # every round prunes more
    assert sp[-1] == pytest.approx(0.8) and hist.rounds[-1].final
    assert sum(r.final for r in hist.rounds) == 1 and len(calls) == len(hist)
    assert 1 < len(hist) < 30
    # a round budget: the last allowed round goes to the target
    m2 = mlp((4, 16, 16, 3))
    h2 = so.prune.iterative(m2, fit, target=0.8, schedule="pq", rounds=2, progress=False)
    assert len(h2) == 2 and h2[-1].target_sparsity == pytest.approx(0.8)


def test_bad_pq_input_names_the_argument():
    for kw, name in (({"p": 0}, "p"), ({"p": 1.0, "q": 0.5}, "q"), ({"gamma": 0}, "gamma"),
                     ({"eta_r": -1}, "eta_r"), ({"beta": 1.5}, "beta")):
        with pytest.raises(ValueError, match=name):
            pq_prune_count(W, M, **kw)
    with pytest.raises(ValueError, match="retained"):
        pq_index(W, mask=torch.zeros(5))
    with pytest.raises(ValueError, match="schedule"):
        so.prune.iterative(mlp(), lambda m, callbacks=(): None, schedule="pqq", progress=False)
    with pytest.raises(ValueError, match="gamma"):
        so.prune.iterative(mlp(), lambda m, callbacks=(): None, schedule="pq", pq_params={"gamma": -1},
                           progress=False)


def test_pq_next_keep_reads_the_current_trainable_weights():
    torch.manual_seed(0)
    model = mlp((4, 8, 3))
    so.prune.apply(model, "magnitude", 0.25)
    before = pq_next_keep(model, eta_r=0.5)
    with torch.no_grad():  # an optimiser step changes weight_orig; module.weight lags until the next forward
        model[0].weight_orig.mul_(torch.linspace(0.01, 3.0, model[0].weight_orig.numel()).reshape_as(
            model[0].weight_orig))
    after = pq_next_keep(model, eta_r=0.5)
    model(torch.zeros(1, 4, dtype=torch.float64))  # refresh module.weight
    assert after == pytest.approx(pq_next_keep(model, eta_r=0.5), rel=0, abs=0)
    assert after != before
