"""What the data-parallel tests run: tiny CNFs, the scenarios every rank runs in turn (some also in
the test process, to compare with) and the spawn target. tests/distributed/conftest.py puts this
folder on sys.path, so the spawned ranks import this module by name.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import io
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils import prune as torch_prune

import sparseode as so
import sparseode.data as D
from sparseode import distributed
from sparseode.models import CNF, MLPVectorField
from sparseode.train import fit

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


def spawn_ranks(out: Path, single_ckpt: str) -> list[dict]:
    """Run every scenario on WORLD spawned ranks; what each rank returned (or raised), by rank."""
    mp.start_processes(_entry, args=(WORLD, str(out / "store"), str(out), single_ckpt), nprocs=WORLD,
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
