"""Data-parallel training on 2 CPU ranks (gloo, torch.multiprocessing spawn) against one process.

The ranks start once per module (spawning costs seconds) and run every scenario in turn; the
tests compare what each rank returned with a single-process run. The process group has a short
timeout, so a regression that makes the ranks wait on each other fails instead of hanging CI.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import io
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils import prune as torch_prune

import sparseode as so
import sparseode.data as D
from sparseode import distributed
from sparseode.models import CNF, MLPVectorField
from sparseode.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
N = 40          # rows: global batches of 16, 16 and a ragged 8 (4 per rank)
BATCH = 16


def tiny_cnf(seed: int = 0) -> CNF:
    """A deterministic CNF: exact trace, fixed-step rk4 (the same work whatever the batch)."""
    torch.manual_seed(seed)
    return CNF(MLPVectorField(2, (8, 8)), trace="exact", method="rk4", options={"step_size": 0.25})


def masked_cnf(seed: int = 0) -> CNF:
    model = tiny_cnf(seed)
    g = torch.Generator().manual_seed(1)
    for layer in model.field.layers:
        if isinstance(layer, torch.nn.Linear):
            torch_prune.custom_from_mask(layer, "weight", torch.rand(layer.weight.shape, generator=g) > 0.5)
    return model


def sparse_cnf(seed: int = 0) -> torch.nn.Module:
    return so.sparsify(masked_cnf(seed), format="csr")


MODELS = {"dense": tiny_cnf, "masked": masked_cnf, "sparse": sparse_cnf}


def data() -> torch.Tensor:
    return D.toy("gaussians", N, seed=0)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def masks_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in so.prune.masks(model).items()}


# -- scenarios (run on every rank, and some also in the test process) ---------------------------
def fit_epoch(kind: str) -> dict:
    model = MODELS[kind]()
    res = fit(model, data(), epochs=1, lr=1e-2, batch_size=BATCH, progress=False)
    return {"state": state_of(model), "loss": res.history[0]["loss"], "steps": res.steps}


def batch_list() -> list[torch.Tensor]:
    x = data()
    return [x[i:i + BATCH] for i in range(0, N, BATCH)]


def fit_loader(kind: str) -> dict:
    """One epoch over a re-iterable of batches: a list (each batch split over the ranks) or, under
    DDP, a DataLoader whose DistributedSampler hands every rank its own rows."""
    model = tiny_cnf()
    if kind == "sampler":
        from torch.utils.data import DataLoader, TensorDataset
        from torch.utils.data.distributed import DistributedSampler

        ds = TensorDataset(data())
        loader = DataLoader(ds, batch_size=BATCH // WORLD, sampler=DistributedSampler(ds, shuffle=False))
    else:
        loader = batch_list()
    res = fit(model, loader, epochs=1, lr=1e-2, progress=False)
    return {"state": state_of(model), "steps": res.steps}


def retrain(model, callbacks=(), fail_at=None, calls=None):
    if calls is not None:
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
    return fit(model, data(), epochs=1, lr=1e-2, batch_size=BATCH, callbacks=callbacks, progress=False)


def run_iterative(ckpt_dir: str | None, *, resume: bool = False, fail_at: int | None = None,
                  progress: bool = False, sparse: bool | str = "auto") -> dict:
    """3 rounds to 75% with SNIP scores on 4 scoring batches (2 per rank under DDP)."""
    model = tiny_cnf()
    x = data()
    score_batches = [(x[i:i + 10],) for i in range(0, N, 10)]
    fit_fn = functools.partial(retrain, fail_at=fail_at, calls=[]) if fail_at else retrain
    hist = so.prune.iterative(model, fit_fn, target=0.75, rounds=3, method="snip", data=score_batches,
                              n_batches=4, checkpoint_dir=ckpt_dir, resume=resume, progress=progress,
                              sparse=sparse)
    return {"masks": masks_of(model), "state": state_of(model), "rounds": [r["round"] for r in hist.to_dicts()],
            "sparsity": [r["sparsity"] for r in hist.to_dicts()], "forms": [r.sparse for r in hist.rounds]}


class _CountSaves:
    def __init__(self):
        self.n, self.save = 0, torch.save

    def __call__(self, *a, **k):
        self.n += 1
        return self.save(*a, **k)


def rank0_outputs(out: str) -> dict:
    """iterative with a progress bar and checkpoints: what this rank printed and saved."""
    counter, err = _CountSaves(), io.StringIO()
    torch.save = counter
    try:
        with contextlib.redirect_stderr(err):
            r = run_iterative(str(Path(out) / "ckpt-bar"), progress=True)
    finally:
        torch.save = counter.save
    return {"saves": counter.n, "stderr": err.getvalue(), "masks": r["masks"]}


def icp_rounds(measure: str) -> dict:
    """3 rounds with the ICP rule checking every step on a probe set of 3 batches."""
    tolerances = {"connectivity": {"eps_grad": 10.0, "eps_info": 10.0}, "discrepancy": {"tol_info": 0.9, "tol_grad": 5.0}}
    model = tiny_cnf()
    x = data()
    probe = [(x[:10],), (x[10:20],), (x[20:25],)]  # sharded: rank 0 measures 2 batches, rank 1 one
    stop = so.prune.ICP(measure, probe=probe, check_every=1, min_steps=1, **tolerances[measure])
    seen = []

    def fit_fn(m, callbacks=()):
        seen.append(len(stop.probe))  # the probe batches this rank measures during the round
        return fit(m, x, epochs=2, lr=1e-2, batch_size=BATCH, callbacks=callbacks, progress=False)

    hist = so.prune.iterative(model, fit_fn, target=0.75, rounds=3, stop=stop, progress=False)
    return {"masks": masks_of(model), "steps": [r["steps"] for r in hist.to_dicts()],
            "reasons": [r["stop_reason"] for r in hist.to_dicts()], "checks": [r.checks for r in hist.rounds],
            "probe_batches": seen, "probe_after": len(stop.probe)}


def resume_after_kill(out: str) -> dict:
    ckpt = str(Path(out) / "ckpt-killed")
    try:
        run_iterative(ckpt, fail_at=3)  # killed in the third round's retraining
    except KeyboardInterrupt:
        pass
    return run_iterative(ckpt, resume=True)


def resume_single_process_run(ckpt: str) -> dict:
    return run_iterative(ckpt, resume=True)


def bad_batch() -> str:
    fit(tiny_cnf(), data(), epochs=1, batch_size=15, progress=False)
    return "no error"


def models_disagree() -> str:
    fit(tiny_cnf(seed=distributed.rank()), data(), epochs=1, batch_size=BATCH, progress=False)
    return "no error"


def data_disagree() -> str:
    x = D.toy("gaussians", N, seed=distributed.rank())  # each rank its own rows: would be halved again
    fit(tiny_cnf(), x, epochs=1, batch_size=BATCH, progress=False)
    return "no error"


def masks_disagree() -> dict:
    """Ranks prune differently: the check says so, and rank 0's masks broadcast repair it."""
    model = tiny_cnf()
    layer = model.field.layers[0]
    torch_prune.custom_from_mask(layer, "weight", torch.rand(layer.weight.shape,
                                                             generator=torch.Generator().manual_seed(distributed.rank())) > 0.5)
    try:
        distributed.check_same_masks(model, "in the test")
        caught = "no error"
    except RuntimeError as e:
        caught = str(e)
    distributed.broadcast_masks(model)
    distributed.check_same_masks(model, "after the broadcast")
    return {"caught": caught, "mask": layer.weight_mask.clone()}


def auto_sparsify() -> dict:
    torch.set_num_threads(1 + distributed.rank())  # the ranks would time formats differently
    model = distributed.sparsify(masked_cnf(), format="auto", batch_hint=64)
    torch.set_num_threads(1)
    res = fit(model, data(), epochs=1, batch_size=BATCH, progress=False)
    return {"structure": [(n, type(m).__name__) for n, m in model.named_modules()],
            "params": [n for n, _ in model.named_parameters()], "steps": res.steps}


def ddp_checkpoint(out: str) -> dict:
    model = tiny_cnf()
    path = Path(out) / "best.pt"
    fit(model, data(), epochs=2, batch_size=BATCH, val_data=data(), checkpoint=path, progress=False)
    return {"path": str(path), "state": state_of(model)}


SCENARIOS = {
    "fit_dense": lambda out, ref: fit_epoch("dense"),
    "fit_masked": lambda out, ref: fit_epoch("masked"),
    "fit_sparse": lambda out, ref: fit_epoch("sparse"),
    "fit_list": lambda out, ref: fit_loader("list"),
    "fit_sampler": lambda out, ref: fit_loader("sampler"),
    "iterative": lambda out, ref: run_iterative(None),
    "iterative_sparse": lambda out, ref: run_iterative(None, sparse=True),
    "rank0_outputs": lambda out, ref: rank0_outputs(out),
    "icp_connectivity": lambda out, ref: icp_rounds("connectivity"),
    "icp_discrepancy": lambda out, ref: icp_rounds("discrepancy"),
    "resume_after_kill": lambda out, ref: resume_after_kill(out),
    "resume_single": lambda out, ref: resume_single_process_run(ref),
    "bad_batch": lambda out, ref: bad_batch(),
    "models_disagree": lambda out, ref: models_disagree(),
    "data_disagree": lambda out, ref: data_disagree(),
    "masks_disagree": lambda out, ref: masks_disagree(),
    "auto_sparsify": lambda out, ref: auto_sparsify(),
    "ddp_checkpoint": lambda out, ref: ddp_checkpoint(out),
}


def _entry(rank: int, world: int, store: str, out: str, ref: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = {"ok": scenario(out, ref)}
            except Exception as e:  # noqa: BLE001 - reported to the test
                results[name] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_killed_run(tmp_path_factory) -> str:
    """A single-process run's checkpoint folder, killed in its second round (resumed on 2 ranks)."""
    ckpt = tmp_path_factory.mktemp("single") / "ckpt"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_iterative(str(ckpt), fail_at=2)
    except KeyboardInterrupt:
        pass
    finally:
        torch.set_num_threads(n)
    assert sorted(p.name for p in ckpt.glob("round_*.pt")) == ["round_00.pt"]  # killed in round 1
    return str(ckpt)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, single_killed_run) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_entry, args=(WORLD, str(out / "store"), str(out), single_killed_run), nprocs=WORLD,
                       join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def ok(ranks: list[dict], name: str) -> list:
    for r, res in enumerate(ranks):
        assert "error" not in res[name], f"rank {r}, {name}: {res[name].get('tb')}"
    return [res[name]["ok"] for res in ranks]


def errors(ranks: list[dict], name: str) -> list[str]:
    for r, res in enumerate(ranks):
        assert "error" in res[name], f"rank {r}, {name}: no error, returned {res[name].get('ok')!r}"
    return [res[name]["error"] for res in ranks]


def assert_states_close(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}, {k}: {m}")


# -- tests ---------------------------------------------------------------------------------------
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


def test_auto_formats_are_decided_once_for_every_rank(ranks):
    r0, r1 = ok(ranks, "auto_sparsify")
    assert r0["structure"] == r1["structure"] and r0["params"] == r1["params"]
    assert r0["steps"] == r1["steps"] == 3  # and DDP accepted the model


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
