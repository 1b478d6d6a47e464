"""Training on 2 ranks equals training in one process: one epoch of fit (dense, masked, sparse
models; batches from a tensor, a list or a DistributedSampler), rounds of iterative pruning (masked
and sparse), the ICP rule on probe shards, and auto formats decided once for every rank. The ranks
run in tests/distributed/conftest.py's ``ranks`` fixture."""
from __future__ import annotations

import pytest
import torch

from ddp_scenarios import MODELS, assert_states_close, fit_epoch, fit_loader, icp_rounds, ok, run_iterative


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_one_epoch_on_two_ranks_equals_one_process_with_the_global_batch(ranks, kind):
    single = fit_epoch(kind)
    on_ranks = ok(ranks, f"fit_{kind}")
    for r in on_ranks:
        assert r["steps"] == single["steps"] == 3
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert_states_close(r["state"], single["state"], kind)
    for k in single["state"]:  # DDP all-reduced the same gradients: the ranks agree bit for bit
        assert torch.equal(on_ranks[0]["state"][k], on_ranks[1]["state"][k])
    init = MODELS[kind]().state_dict()  # and training moved the weights
    assert any(not torch.equal(init[k], single["state"][k]) for k in init)


@pytest.mark.parametrize("kind", ["list", "sampler"])
def test_batches_from_an_iterable_or_a_distributed_sampler_match_one_process(ranks, kind):
    single = fit_loader("list")
    for r in ok(ranks, f"fit_{kind}"):
        assert r["steps"] == single["steps"] == 3
        assert_states_close(r["state"], single["state"], kind)


def test_three_rounds_of_iterative_on_two_ranks_end_with_the_masks_of_one_process(ranks):
    single = run_iterative(None)
    for r in ok(ranks, "iterative"):
        assert r["rounds"] == [0, 1, 2] and r["sparsity"] == single["sparsity"]
        assert set(r["masks"]) == set(single["masks"]) and len(single["masks"]) == 3
        for k, m in single["masks"].items():
            assert torch.equal(r["masks"][k], m), k
        assert_states_close(r["state"], single["state"], "after 3 rounds")
    assert single["sparsity"][-1] == pytest.approx(0.75, abs=0.02)


def test_sparse_rounds_on_two_ranks_agree_and_equal_masked_rounds_of_one_process(ranks):
    from sparseode.nn import fused_field

    if not fused_field.op_available()[0]:
        pytest.skip("sparseode._C with the fused field op is not built here")
    masked = run_iterative(None, sparse=False)
    on_ranks = ok(ranks, "iterative_sparse")
    assert masked["forms"] == [False] * 3
    for r in on_ranks:  # every round retrained on the sparsified model, on both ranks
        assert r["forms"] == [True] * 3 and r["sparsity"] == masked["sparsity"]
        for k, m in masked["masks"].items():
            assert torch.equal(r["masks"][k], m), k
        assert_states_close(r["state"], masked["state"], "sparse rounds on 2 ranks")
    for k in masked["state"]:  # the ranks hold the same model
        assert torch.equal(on_ranks[0]["state"][k], on_ranks[1]["state"][k]), k


@pytest.mark.parametrize("measure", ["connectivity", "discrepancy"])
def test_icp_on_probe_shards_measures_and_stops_as_one_process_on_the_whole_probe(ranks, measure):
    single = icp_rounds(measure)
    assert single["reasons"][:2] != ["budget", "budget"]  # the rule did end rounds early
    values = ("info", "grad", "loss") if measure == "connectivity" else ("max_info", "max_grad_dev", "loss")
    assert single["probe_batches"] == [3, 3, 3]
    on_ranks = ok(ranks, f"icp_{measure}")
    assert [r["probe_batches"] for r in on_ranks] == [[2, 2, 2], [1, 1, 1]]  # each measured its share
    assert [r["probe_after"] for r in on_ranks] == [3, 3]  # and got the whole probe back
    for r in on_ranks:
        assert r["steps"] == single["steps"] and r["reasons"] == single["reasons"]
        for k, m in single["masks"].items():
            assert torch.equal(r["masks"][k], m), k
        for got, want in zip(r["checks"], single["checks"]):  # every check's measured values
            assert len(got) == len(want)
            for a, b in zip(got, want):
                for v in values:
                    assert a[v] == pytest.approx(b[v], rel=1e-4, abs=1e-6), (measure, v)


def test_auto_formats_are_decided_once_for_every_rank(ranks):
    r0, r1 = ok(ranks, "auto_sparsify")
    assert r0["structure"] == r1["structure"] and r0["params"] == r1["params"]
    assert r0["steps"] == r1["steps"] == 3  # and DDP accepted the model
