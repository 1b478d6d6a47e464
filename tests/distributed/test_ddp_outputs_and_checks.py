"""What a 2-rank run writes and refuses: rank 0 alone shows progress and saves checkpoints, a
killed run resumes (also from a single-process checkpoint), a DDP checkpoint loads in one process,
ranks that disagree (batch size, model, data, masks) fail at the start or are repaired, the
helpers are no-ops in one process, and ``sparseode prune`` under torchrun writes its outputs once.
The ranks run in tests/distributed/conftest.py's ``ranks`` fixture."""
from __future__ import annotations

import sys

import pytest
import torch

import sparseode as so
from ddp_scenarios import assert_states_close, errors, ok, run_iterative, tiny_cnf
from sparseode import distributed
from sparseode.models import MLPVectorField


def test_only_rank_0_shows_progress_and_writes_checkpoints(ranks):
    r0, r1 = ok(ranks, "rank0_outputs")
    assert r0["saves"] == 3 and r1["saves"] == 0  # round_00..02.pt, by rank 0 alone
    assert "prune snip" in r0["stderr"] and r1["stderr"] == ""
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k])


def test_a_killed_two_rank_run_resumes_from_its_last_round(ranks):
    single = run_iterative(None)
    for r in ok(ranks, "resume_after_kill"):
        assert r["rounds"] == [0, 1, 2]
        for k, m in single["masks"].items():
            assert torch.equal(r["masks"][k], m), k
        assert_states_close(r["state"], single["state"], "resumed")


def test_a_single_process_checkpoint_resumes_on_two_ranks(ranks, single_killed_run):
    single = run_iterative(None)
    for r in ok(ranks, "resume_single"):
        assert r["rounds"] == [0, 1, 2]
        for k, m in single["masks"].items():
            assert torch.equal(r["masks"][k], m), k


def test_a_ddp_checkpoint_loads_in_one_process(ranks):
    r0, _ = ok(ranks, "ddp_checkpoint")
    saved = torch.load(r0["path"], weights_only=True)
    assert not any(k.startswith("module.") for k in saved["state_dict"])
    model = tiny_cnf()
    model.load_state_dict(saved["state_dict"])  # strict: same keys, no DDP prefix
    assert saved["epoch"] in (0, 1)


def test_a_world_size_that_does_not_divide_the_batch_fails_at_the_start(ranks):
    for e in errors(ranks, "bad_batch"):
        assert e.startswith("ValueError") and "world size 2 does not divide batch_size=15" in e


def test_ranks_that_disagree_on_the_model_fail_at_the_start(ranks):
    for e in errors(ranks, "models_disagree"):
        assert e.startswith("RuntimeError") and "ranks disagree on the model at the start of fit" in e
        assert "rank(s) [1]" in e


def test_ranks_holding_different_tensor_data_fail_at_the_start(ranks):
    for e in errors(ranks, "data_disagree"):
        assert e.startswith("RuntimeError") and "ranks disagree on the fit arguments and data" in e
        assert "DistributedSampler" in e


def test_the_pattern_check_catches_ranks_with_different_masks_and_the_broadcast_repairs_them(ranks):
    r0, r1 = ok(ranks, "masks_disagree")
    for r in (r0, r1):
        assert "ranks disagree on the pruning pattern in the test: rank(s) [1]" in r["caught"]
    assert torch.equal(r0["mask"], r1["mask"])
    expected = torch.rand(r0["mask"].shape, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(r1["mask"].bool(), expected)  # rank 0's


def test_helpers_are_single_process_no_ops():
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard(7) == (0, 7) and distributed.any_rank(True) and not distributed.any_rank(False)
    t = [torch.ones(3)]
    assert distributed.mean_over_ranks(t, 2)[0].tolist() == [0.5, 0.5, 0.5]
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:0") == "nccl"
    assert distributed.model_fingerprint(tiny_cnf(0)) == distributed.model_fingerprint(tiny_cnf(0))
    assert distributed.model_fingerprint(tiny_cnf(0)) != distributed.model_fingerprint(tiny_cnf(1))
    distributed.check_divides(15)  # one process divides everything


def test_sparseode_prune_under_torchrun_writes_its_outputs_once(tmp_path):
    import json
    import os
    import subprocess

    from sparseode.checkpoint import save
    from sparseode.models import CNF as Flow

    torch.manual_seed(0)
    src = tmp_path / "train"
    src.mkdir()
    save(Flow(MLPVectorField(2, (8, 8), activation="tanh"), rtol=1e-3, atol=1e-3), src / "model.pt")
    (src / "train.json").write_text(json.dumps({"model": "cnf", "dataset": "gaussians", "hidden": [8, 8]}))
    out = tmp_path / "prune"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparseode.cli",
           "prune", "--checkpoint", str(src / "model.pt"), "--rounds", "2", "--retrain-epochs", "1",
           "--method", "snip", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", SPARSEODE_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("retraining epochs") == 1  # printed by rank 0 only
    record = json.loads((out / "prune.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1] and record["rounds"][-1]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["cascade.json", "round_00.pt", "round_01.pt"]
    pruned = so.load(out / "pruned.pt")
    assert so.prune.sparsity(pruned).total == record["rounds"][-1]["sparsity"]
