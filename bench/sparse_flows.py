"""Sparse Flows reproduction study (Liebenwein et al. 2021): pruned CNFs on toy densities.

    OMP_NUM_THREADS=1 python bench/sparse_flows.py     # the full plan, priority order (~2 h on one loaded core)
    python bench/sparse_flows.py --datasets gaussians --archs demo --rules lamp,global --seeds 0,1,2
    python bench/sparse_flows.py --max-cells 0          # only rebuild the tables and plot from the CSVs
    python bench/sparse_flows.py --tiny --out /tmp/sf   # smoke test (seconds)

A cell is (dataset, architecture, pruning rule, seed, schedule, retraining steps per round, LR). Its
dense CNF is trained once (cached per dataset/arch/seed), pruned by ``so.prune.iterative`` along
the schedule (``five``: the demo's keep ratios 0.5, 0.25, 0.1, 0.05, 0.02; ``sparse_flows``: the
paper's 29, geometric 0.8 -> 0.2 in 20 rounds then linear 0.18 -> 0.02 in 9), retrained every round
from the current weights with a fresh AdamW (the learning-rate schedule restarts each round), and
evaluated at the schedule's rounds: test NLL (dopri5, rtol = atol = 1e-5, exact trace) and, for
mixture datasets (gaussians; spirals and moons have no known mixture), the strict mode metric
(``so.data.mode_coverage``); cells with ``hessian`` also take the NLL Hessian spectrum.

Architectures: ``demo`` is the field of ``sparseode demo`` (2 -> 64x3 tanh, autonomous, exact trace
in training) with its training recipe; ``paper`` is the paper's toy field (4 x 64 sigmoid, time
concatenated, Hutchinson trace in training, dopri5). Rules: ``lamp`` (LAMP scores, one global
threshold), ``global`` (global magnitude), ``layer`` (per-layer magnitude, the same fraction in
every layer), ``snip`` (SNIP, global), ``neuron`` (whole hidden units by the magnitude of their
rows, the same fraction in every hidden layer; its unit keep ratios are the ones whose weight
densities are nearest the schedule's, ``so.prune.neuron_schedule``). Every rule prunes every layer
of the field, biases excluded.

Budget: the paper retrains 100 epochs per round; here ``--steps`` optimiser steps per round
(batch ``--batch``, ``--n-train`` points: ``steps * batch / n_train`` epochs), the final round
twice that. Results are appended cell by cell to ``<out>/sparse_flows.csv`` (a restarted run skips
finished cells), and ``sparse_flows.md`` / ``sparse_flows.png`` / ``sparse_flows_hessian.csv`` are
rewritten after every cell, so a stopped run loses at most the cell in progress.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

import sparseode as so
import sparseode.data as D
from sparseode import demo
from sparseode.models import CNF, MLPVectorField
from sparseode.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_flows_report as report  # noqa: E402
from prune_flows import test_nll  # noqa: E402  (dopri5 at 1e-5, the model's solver settings restored)

RULES: dict[str, dict[str, str]] = {
    "lamp": {"method": "lamp", "scope": "global"},
    "global": {"method": "magnitude", "scope": "global"},
    "layer": {"method": "magnitude", "scope": "layer"},
    "snip": {"method": "snip", "scope": "global"},
    "neuron": {"method": "magnitude", "granularity": "neuron"},
}
ARCHS = ("demo", "paper")
#: named cascades (keep ratios): the paper's 29 rounds, and the demo's 5 (50, 75, 90, 95, 98%)
SCHEDULES = {"sparse_flows": tuple(so.prune.default_schedule(0.98)), "five": demo.SCHEDULE}
#: keep ratios of the paper's schedule at which a checkpoint is evaluated (every round of the others)
EVAL_KEEP = (0.8, 0.598, 0.48, 0.31, 0.2, 0.14, 0.1, 0.06, 0.04, 0.02)
#: keep ratios of the paper's schedule at which the Hessian spectrum is taken (cells with --hessian;
#: every evaluated round of the others)
HESSIAN_KEEP = (0.48, 0.2, 0.1, 0.02)
FIELDS = ["dataset", "arch", "rule", "seed", "steps", "schedule", "lr", "round", "keep", "sparsity",
          "test_nll", "dense_nll", "gap", "entropy_floor", "strict_held", "n_modes", "lowest_ratio", "off_mode",
          "strict_ok", "cell_s"]


def make_cnf(arch: str, seed: int) -> CNF:
    """A fresh CNF of architecture ``arch`` (training solver settings), seeded initialisation."""
    torch.manual_seed(seed)
    if arch == "demo":
        return demo.make_cnf(demo.HIDDEN, demo.TRAIN_TOL)
    field = MLPVectorField(2, (64, 64, 64, 64), time="concat", activation="sigmoid")
    return CNF(field, trace="hutchinson", method="dopri5", rtol=1e-3, atol=1e-3)


def make_data(dataset: str, n_train: int, n_test: int, seed: int) -> dict[str, torch.Tensor]:
    return {"train": D.toy(dataset, n=n_train, seed=seed), "val": D.toy(dataset, n=2048, seed=seed + 1),
            "test": D.toy(dataset, n=n_test, seed=seed + 2)}


def modes(model: CNF, dataset: str, n: int) -> dict[str, Any]:
    """Strict mode metric of ``n`` samples (empty for datasets with no known mixture)."""
    if dataset not in D.MIXTURES:
        return {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        cov = D.mode_coverage(model.sample(n), dataset)
    return {"strict_held": cov["modes_held"], "n_modes": cov["n_modes"], "lowest_ratio": min(cov["share_ratios"]),
            "off_mode": cov["off_mode"], "strict_ok": cov["strict_ok"]}


def dense_model(args: argparse.Namespace, dataset: str, arch: str, seed: int,
                data: dict[str, torch.Tensor]) -> CNF:
    """The dense flow of (dataset, arch, seed): trained with the demo's recipe, or from the cache."""
    model = make_cnf(arch, seed)
    key = {"n_train": args.n_train, "epochs": args.dense_epochs, "batch": args.batch, "lr": args.lr}
    path = Path(args.cache) / f"dense_{dataset}_{arch}_{seed}.pt" if args.cache else None
    if path is not None and path.exists():
        blob = torch.load(path, weights_only=True)
        if blob["key"] == key:
            model.load_state_dict(blob["state_dict"])
            return model
    fit(model, data["train"], epochs=args.dense_epochs, batch_size=args.batch, lr=args.lr, val_data=data["val"],
        seed=seed, progress=not args.no_progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state_dict": model.state_dict()}, path)
    return model


def retrain(args: argparse.Namespace, data: dict[str, torch.Tensor], seed: int, steps: int, lr: float):
    """One round's retraining: ``steps`` AdamW steps at ``lr`` (whole epochs, the best validation
    state kept)."""
    epochs = max(1, math.ceil(steps * args.batch / len(data["train"])))
    return functools.partial(fit, data=data["train"], epochs=epochs, max_steps=steps, batch_size=args.batch,
                             lr=lr, val_data=data["val"], seed=seed, progress=False)


def hessian(model: CNF, x: torch.Tensor, n: int) -> dict[str, float]:
    """Top eigenvalue (``n`` power iterations) and trace (``n`` Hutchinson probes) of the NLL Hessian
    over the kept weights, with the exact trace in the NLL (a Hutchinson trace would make it noisy)."""
    saved, model.trace = model.trace, "exact"
    try:
        h = so.prune.hessian_spectrum(model, None, [(x,)], n_iter=n, n_hutchinson=n, params="weights")
    finally:
        model.trace = saved
    return {"hess_top": h.top_eigenvalue, "hess_trace": h.trace, "hess_trace_se": h.trace_stderr, "dim": h.dim}


def run_cell(args: argparse.Namespace, cell: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Prune one dense flow along the schedule; rows of the evaluated rounds, and Hessian rows."""
    dataset, arch, rule, seed, steps = (cell[k] for k in ("dataset", "arch", "rule", "seed", "steps"))
    keeps = list(SCHEDULES.get(cell["schedule"], args.keep))
    eval_keep = EVAL_KEEP if cell["schedule"] == "sparse_flows" else keeps
    t0 = time.perf_counter()
    data = make_data(dataset, args.n_train, args.n_test, seed)
    dense = dense_model(args, dataset, arch, seed, data)
    dense_nll = test_nll(dense, data["test"])
    floor = D.true_entropy(dataset) if dataset in D.MIXTURES else math.nan
    base = {"dataset": dataset, "arch": arch, "rule": rule, "seed": seed, "steps": steps,
            "schedule": cell["schedule"], "lr": cell["lr"], "dense_nll": dense_nll,
            "entropy_floor": floor}
    probe = data["val"][:args.hessian_points]
    hess = [{**base, "round": -1, "keep": 1.0, "sparsity": 0.0, **hessian(dense, probe, args.hessian_iters)}] \
        if cell["hessian"] else []
    rows = [{**base, "round": -1, "keep": 1.0, "sparsity": 0.0, "test_nll": dense_nll, "gap": 0.0,
             **modes(dense, dataset, args.n_samples)}]
    model = so.prune.clone(dense)
    n_score = max(1, min(4, len(data["train"]) // args.batch))  # whole batches for SNIP's gradients
    score_data = [(data["train"][i * args.batch:(i + 1) * args.batch],) for i in range(n_score)]
    fitter = retrain(args, data, seed, steps, cell["lr"])
    # the neuron rule's schedule is in units: those whose weight densities are nearest to keeps
    prune_keeps = so.prune.neuron_schedule(model, keeps) if rule == "neuron" else keeps
    hist = so.prune.iterative(model, fitter, target=1 - prune_keeps[-1], schedule=prune_keeps,
                              final_fit=retrain(args, data, seed, 2 * steps, cell["lr"]), data=score_data,
                              n_batches=n_score, seed=seed, progress=not args.no_progress, **RULES[rule])
    for k, (rec, sd) in enumerate(zip(hist.rounds, hist.checkpoints)):
        keep = keeps[k]
        if not any(abs(keep - e) < 5e-4 for e in eval_keep) and k != len(hist.rounds) - 1:
            continue
        m = so.prune.clone(dense)
        so.prune.load_pruned(m, sd)
        nll = test_nll(m, data["test"])
        rows.append({**base, "round": k, "keep": keep, "sparsity": rec.sparsity, "test_nll": nll,
                     "gap": nll - dense_nll, **modes(m, dataset, args.n_samples)})
        if cell["hessian"] and (keeps != EVAL_KEEP or any(abs(keep - e) < 5e-4 for e in HESSIAN_KEEP)):
            hess.append({**base, "round": k, "keep": keep, "sparsity": rec.sparsity,
                         **hessian(m, probe, args.hessian_iters)})
    for r in rows:
        r["cell_s"] = time.perf_counter() - t0
    return rows, hess


def plan(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The cells in priority order (``--plan full``) or the product of the list arguments."""
    def cell(dataset, arch, rule, seed, steps=args.steps, hessian=False, schedule=args.schedule, lr=args.retrain_lr):
        return {"dataset": dataset, "arch": arch, "rule": rule, "seed": seed, "steps": steps, "hessian": hessian,
                "schedule": schedule, "lr": lr}

    if args.plan == "product":
        for d in args.datasets:
            for a in args.archs:
                for s in args.seeds:
                    for r in args.rules:
                        yield cell(d, a, r, s, hessian=args.hessian and s == args.seeds[0])
        return
    first, rest = ("lamp", "global"), ("layer", "snip")
    for steps in (args.steps, 2 * args.steps, 4 * args.steps):  # neuron pruning: 98% on the demo flow, by budget
        for s in (0, 1, 2):
            yield cell("gaussians", "demo", "neuron", s, steps)
    for s in (0, 1, 2):
        yield cell("gaussians", "paper", "neuron", s)
    for d in ("spirals", "moons"):
        for a in ("demo", "paper"):
            yield cell(d, a, "neuron", 0)
    for r in first:  # the two leading rules on gaussians at the demo architecture
        yield cell("gaussians", "demo", r, 0)
    for r, lr in (("lamp", 3e-3), ("global", 3e-3), ("lamp", 1e-3), ("global", 1e-3)):
        # the paper's 29 rounds at about the same total budget, with the Hessian table
        yield cell("gaussians", "demo", r, 0, args.steps // 6, schedule="sparse_flows", lr=lr, hessian=True)
    for steps in (2 * args.steps, args.steps // 2):  # NLL at 98% against the retraining budget
        yield cell("gaussians", "demo", "lamp", 0, steps)
    yield cell("gaussians", "paper", "lamp", 0, hessian=True)
    for s in (1, 2):
        yield cell("gaussians", "demo", "lamp", s)
    for d in ("spirals", "moons"):  # no known mixture: NLL only
        yield cell(d, "demo", "lamp", 0)
    for r in rest:
        yield cell("gaussians", "demo", r, 0)
    yield cell("gaussians", "demo", "snip", 0, 2 * args.steps)
    yield cell("gaussians", "demo", "lamp", 0, 4 * args.steps)
    for s in (1, 2):
        yield cell("gaussians", "demo", "global", s)
    yield cell("gaussians", "paper", "global", 0)
    for s in (1, 2):
        for r in rest:
            yield cell("gaussians", "demo", r, s)
    for r in rest:
        yield cell("gaussians", "paper", r, 0)
    for a in ("demo", "paper"):
        for d in ("spirals", "moons"):
            for r in RULES:
                yield cell(d, a, r, 0)
    for s in (1, 2):
        for r in RULES:
            yield cell("gaussians", "paper", r, s)
    for s in (1, 2):
        for d in ("spirals", "moons"):
            for a in ("demo", "paper"):
                for r in RULES:
                    yield cell(d, a, r, s)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=("full", "product"), default=None,
                   help="full: the priority-ordered study; product: every combination of the lists below "
                        "(default: product when any list is given, else full)")
    p.add_argument("--datasets", type=lambda s: s.split(","), default=None, help="e.g. gaussians,spirals,moons")
    p.add_argument("--archs", type=lambda s: s.split(","), default=None, help="demo,paper")
    p.add_argument("--rules", type=lambda s: s.split(","), default=None, help=",".join(RULES))
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--steps", type=int, default=96,
                   help="retraining steps per round of the main grid (final round: twice); 96 = 6 epochs")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="five",
                   help="cascade of the main grid: five (the demo's 5 rounds) or sparse_flows (the paper's 29)")
    p.add_argument("--keep", type=lambda s: [float(v) for v in s.split(",")], default=None,
                   help="custom keep ratios instead of --schedule")
    p.add_argument("--batch", type=int, default=demo.BATCH)
    p.add_argument("--lr", type=float, default=demo.LR, help="dense training LR")
    p.add_argument("--retrain-lr", type=float, default=demo.RETRAIN_LR,
                   help="retraining LR (a fresh AdamW each round starts here: at 3e-3, 16 steps after pruning "
                        "20%% cost 0.1 nats that pruning alone did not)")
    p.add_argument("--n-train", type=int, default=demo.N_TRAIN)
    p.add_argument("--n-test", type=int, default=2048)
    p.add_argument("--n-samples", type=int, default=2000, help="samples of the strict mode metric")
    p.add_argument("--dense-epochs", type=int, default=demo.EPOCHS)
    p.add_argument("--hessian", action="store_true", help="with --plan product: Hessian spectra of the first seed")
    p.add_argument("--hessian-iters", type=int, default=10, help="power iterations and Hutchinson probes")
    p.add_argument("--hessian-points", type=int, default=256, help="validation points of the Hessian's NLL")
    p.add_argument("--cache", default="runs/sparse_flows", help="dense models are cached here ('' for none)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--max-cells", type=int, default=None, help="stop after this many new cells")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tiny", action="store_true", help="smoke-test budget (seconds)")
    args = p.parse_args(argv)
    lists = ("datasets", "archs", "rules", "seeds")
    if args.plan is None:
        args.plan = "product" if any(getattr(args, k) is not None for k in lists) else "full"
    defaults = {"datasets": ["gaussians"], "archs": ["demo"], "rules": list(RULES), "seeds": [0]}
    for k in lists:
        setattr(args, k, getattr(args, k) or defaults[k])
    for r in args.rules:
        if r not in RULES:
            p.error(f"--rules: unknown rule {r!r}; choose from {sorted(RULES)}")
    for a in args.archs:
        if a not in ARCHS:
            p.error(f"--archs: unknown architecture {a!r}; choose from {list(ARCHS)}")
    for d in args.datasets:
        if d not in D.TOY_DATASETS:
            p.error(f"--datasets: unknown dataset {d!r}; choose from {sorted(D.TOY_DATASETS)}")
    if args.tiny:
        args.n_train, args.n_test, args.n_samples, args.dense_epochs, args.steps = 256, 256, 300, 1, 2
        args.batch, args.keep, args.cache = 128, args.keep or [0.5, 0.1], ""
        args.hessian_iters, args.hessian_points = 2, 32
    if args.keep is not None:
        args.schedule = "custom"
    args.keep = args.keep or list(SCHEDULES[args.schedule])
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, hess_path = out / "sparse_flows.csv", out / "sparse_flows_hessian.csv"
    done, hess = report.read_csv(csv_path), report.read_csv(hess_path)
    new = 0
    bar = tqdm(desc="cells", disable=args.no_progress)
    for cell in plan(args):
        if report.has_cell(done, cell):
            continue
        if args.max_cells is not None and new >= args.max_cells:
            break
        bar.set_postfix_str(f"{cell['dataset']}/{cell['arch']}/{cell['rule']}/seed {cell['seed']}/{cell['steps']}")
        rows, hrows = run_cell(args, cell)
        done += report.append_csv(csv_path, FIELDS, rows)
        if hrows:
            hess += report.append_csv(hess_path, list(hrows[0]), hrows)
        report.write(out, done, hess, args)
        new += 1
        bar.update()
        print(f"cell {cell} done in {rows[0]['cell_s']:.0f} s", file=sys.stderr, flush=True)
    bar.close()
    report.write(out, done, hess, args)
    print((out / "sparse_flows.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
