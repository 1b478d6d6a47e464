"""Flow-pruning experiment (Liebenwein et al. 2021, "Sparse flows") on the `gaussians` toy flow.

    python bench/prune_flows.py                          # all measures, default budget (~10 min here)
    python bench/prune_flows.py --methods magnitude,snip --retrain-steps 200
    python bench/prune_flows.py --quick                  # smoke test

A CNF with a 4-hidden-layer (64 units each) sigmoid field (time concatenated) is trained dense on
`gaussians`, then, for every importance measure, pruned by the iterative prune-retrain cascade
(`so.prune.iterative`, global unstructured pruning, retraining from the current weights with a
fresh optimiser each round). After every round: test NLL (dopri5, rtol = atol = 1e-5), modes
captured by 5000 samples (`so.data.mode_coverage`), the NLL right after pruning (before
retraining) and how many retraining steps it took to get back to the pre-pruning training loss.

Writes to --out: `results.json`, `nll_vs_sparsity.csv`, `modes_vs_sparsity.csv`,
`nll_vs_sparsity.png`, `modes_vs_sparsity.png`; prints the tables. The dense model is cached
(--dense-cache) so that repeated runs and bench/icp.py start from the same network.

Expected from the literature: test NLL at 50-80% sparsity no worse than dense, at 90% within a few
hundredths of a nat, all modes kept to high sparsity; magnitude recovering fastest after pruning
and GraSP-style sign-following hurting.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sparseode as so
import sparseode.data as D
from sparseode.models import CNF, MLPVectorField
from sparseode.train import evaluate, fit

METHODS = ("magnitude", "snip", "taylor", "grasp", "grasp_abs", "random")
DATASET = "gaussians"


# ----------------------------------------------------------------------------------------------
# shared with bench/icp.py
# ----------------------------------------------------------------------------------------------
def make_flow(args: argparse.Namespace) -> CNF:
    torch.manual_seed(args.seed)
    field = MLPVectorField(2, tuple([args.width] * args.depth), time="concat", activation="sigmoid")
    return CNF(field, trace="exact", method=args.train_method, rtol=args.train_tol, atol=args.train_tol,
               options={"step_size": args.train_step} if args.train_method in ("rk4", "euler", "midpoint") else None)


def flow_data(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    return {
        "train": D.toy(DATASET, args.n_train, seed=1),
        "val": D.toy(DATASET, args.n_val, seed=2),
        "test": D.toy(DATASET, args.n_test, seed=3),
        "probe": D.toy(DATASET, 2 * args.batch_size, seed=4),
    }


def test_nll(model: CNF, x: torch.Tensor) -> float:
    """NLL in nats with dopri5 at rtol = atol = 1e-5 (the solver settings are restored)."""
    saved = (model.method, model.rtol, model.atol, model.options)
    model.method, model.rtol, model.atol, model.options = "dopri5", 1e-5, 1e-5, None
    try:
        return evaluate(model, x, batch_size=len(x))["nll"]
    finally:
        model.method, model.rtol, model.atol, model.options = saved


def dense_flow(args: argparse.Namespace, data: dict[str, torch.Tensor]) -> tuple[CNF, dict[str, Any]]:
    """Train the dense flow (or load it from --dense-cache when the configuration matches)."""
    model = make_flow(args)
    key = {k: getattr(args, k) for k in ("width", "depth", "n_train", "dense_epochs", "batch_size", "lr",
                                         "train_method", "train_step", "train_tol", "seed")}
    cache = Path(args.dense_cache) if args.dense_cache else None
    if cache is not None and cache.exists():
        blob = torch.load(cache)
        if blob.get("key") == key:
            model.load_state_dict(blob["state_dict"])
            return model, {**blob["info"], "cached": True}
    t0 = time.perf_counter()
    res = fit(model, data["train"], epochs=args.dense_epochs, lr=args.lr, batch_size=args.batch_size,
              milestones=[int(args.dense_epochs * 0.7)], gamma=0.3, seed=args.seed,
              progress=not args.no_progress)
    info = {"steps": res.steps, "train_s": time.perf_counter() - t0, "cached": False}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state_dict": model.state_dict(), "info": info}, cache)
    return model, info


def retrain_fn(args: argparse.Namespace, train: torch.Tensor, epochs: int, curves: list | None = None):
    """``fit(model, callbacks)`` for so.prune.iterative: a fresh AdamW per round, its learning-rate
    schedule restarted (``retrain_lr``, times 0.2 for the last third of the round's epochs)."""

    def _fit(model, callbacks=()):
        cbs = list(callbacks)
        if curves is not None:
            curve: list[float] = []
            curves.append(curve)
            cbs.append(lambda st: curve.append(st.loss))
        return fit(model, train, epochs=epochs, lr=args.retrain_lr, batch_size=args.retrain_batch,
                   milestones=[max(1, (2 * epochs) // 3)] if epochs > 1 else (), gamma=0.2,
                   seed=args.seed, callbacks=cbs, progress=False)

    return _fit


def hidden_layers(name: str, module: torch.nn.Module) -> bool:
    """filter_fn keeping the field's input layer (2+1 -> width) and output layer (width+1 -> 2)
    dense, as is customary (they hold 2.5% of the weights)."""
    return module.in_features > 3 and module.out_features > 2


def prune_filter(args: argparse.Namespace):
    return None if args.prune_io else hidden_layers


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="hidden layers of the field")
    p.add_argument("--n-train", type=int, default=8192)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-3, help="dense training LR")
    p.add_argument("--dense-epochs", type=int, default=60)
    p.add_argument("--retrain-lr", type=float, default=5e-3)
    p.add_argument("--retrain-batch", type=int, default=256)
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="global magnitude pruning collapses the field's last layers (weights shrink with "
                        "fan-in): at 80%% it prunes the whole output layer, NLL = the base density's 2.84")
    p.add_argument("--prune-io", action="store_true",
                   help="also prune the field's input and output layers (default: hidden layers only)")
    p.add_argument("--train-method", default="rk4", help="solver while training (fixed step keeps cost flat)")
    p.add_argument("--train-step", type=float, default=0.25)
    p.add_argument("--train-tol", type=float, default=1e-4)
    p.add_argument("--dense-cache", default="runs/prune_flows_dense.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy box)")
    p.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------------------------
def _recovery_steps(curve: list[float], level: float, window: int = 8) -> int | None:
    """First step at which the moving average of the retraining loss is back at ``level``."""
    for i in range(window, len(curve) + 1):
        if sum(curve[i - window:i]) / window <= level:
            return i
    return None


def run_method(method: str, dense: CNF, args: argparse.Namespace, data: dict[str, torch.Tensor],
               keep: list[float]) -> dict[str, Any]:
    model = so.prune.clone(dense)
    curves: list[list[float]] = []
    fitter = retrain_fn(args, data["train"], args.retrain_epochs, curves)
    # the training loss level before each round: last window of the previous retraining
    pre: list[float] = []
    pruned_nll: list[float] = []

    n_score = max(1, min(args.n_score, len(data["train"]) // args.batch_size))
    score_batches = [(data["train"][i * args.batch_size:(i + 1) * args.batch_size],) for i in range(n_score)]

    def loss_level(model) -> float:
        with torch.no_grad():
            return float(sum(-model.log_prob(b[0]).mean() for b in score_batches) / len(score_batches))

    orig_fit = fitter

    def fit_and_track(model, callbacks=()):
        pruned_nll.append(loss_level(model))
        res = orig_fit(model, callbacks)
        pre.append(loss_level(model))
        return res

    pre.append(loss_level(model))
    t0 = time.perf_counter()
    hist = so.prune.iterative(model, fit_and_track, schedule=keep, method=method, loss_fn=None,
                              scope=args.scope, filter_fn=prune_filter(args),
                              data=score_batches, n_batches=n_score, seed=args.seed,
                              evaluate=lambda m: test_nll(m, data["test"]), progress=not args.no_progress)
    rounds = []
    hess = []
    if args.hessian == "all" or args.hessian == method:
        for sd in hist.checkpoints:
            m = so.prune.clone(model)
            so.prune.load_pruned(m, sd)
            hess.append(hessian(m, data))
    cov = so.prune.mode_coverage(model, hist.checkpoints, DATASET, n_samples=args.n_samples, seed=0)
    for k, r in enumerate(hist.rounds):
        level = pre[k]
        rounds.append({
            "sparsity": r.sparsity, "sparsity_all": cov[k]["sparsity"], "test_nll": r.val_metric, "steps": r.steps, "time_s": r.time_s,
            "loss_after_prune": pruned_nll[k], "loss_before_prune": level,
            "recovery_steps": _recovery_steps(curves[k], level + args.recover_tol),
            "modes": cov[k]["coverage"]["modes_captured"], "n_modes": cov[k]["coverage"]["n_modes"],
            "high_quality_3sd": cov[k]["coverage"]["high_quality"][cov[k]["coverage"]["ks"].index(3.0)],
            **(hess[k] if hess else {}),
        })
    return {"method": method, "rounds": rounds, "wall_s": time.perf_counter() - t0}


def hessian(model: CNF, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Top eigenvalue (10 power iterations) and Hutchinson trace (10 probes) of the NLL Hessian
    over the unpruned weights, on 256 validation points."""
    h = so.prune.hessian_spectrum(model, None, [(data["val"][:256],)], n_iter=10, n_hutchinson=10)
    return {"hess_top": h.top_eigenvalue, "hess_trace": h.trace, "hess_trace_se": h.trace_stderr,
            "hess_dim": h.dim}


def _write_tables(out: Path, results: dict[str, Any]) -> str:
    methods = list(results["methods"])
    sp = [r["sparsity"] for r in results["methods"][methods[0]]["rounds"]]
    sp_all = [r["sparsity_all"] for r in results["methods"][methods[0]]["rounds"]]
    lines = ["sparsity: of the pruned layers (all weights of the field in parentheses)"]
    hdr = f"{'sparsity':>16} | " + " ".join(f"{m:>10}" for m in methods)
    dense = results["dense"]
    lines.append(f"test NLL (nats; dense {dense['test_nll']:.4f}, entropy floor {dense['entropy_floor']:.4f})")
    lines.append(hdr)
    rows_nll, rows_modes = [], []
    for i, s in enumerate(sp):
        vals = [results["methods"][m]["rounds"][i]["test_nll"] for m in methods]
        lines.append(f"{s:8.3f} ({sp_all[i]:.3f}) | " + " ".join(f"{v:10.4f}" for v in vals))
        rows_nll.append([f"{s:.4f}", f"{sp_all[i]:.4f}"] + [f"{v:.5f}" for v in vals])
    lines.append("")
    lines.append(f"modes captured (of {dense['n_modes']}; dense {dense['modes']})")
    lines.append(hdr)
    for i, s in enumerate(sp):
        vals = [results["methods"][m]["rounds"][i]["modes"] for m in methods]
        lines.append(f"{s:8.3f} ({sp_all[i]:.3f}) | " + " ".join(f"{v:>10}" for v in vals))
        rows_modes.append([f"{s:.4f}", f"{sp_all[i]:.4f}"] + [str(v) for v in vals])
    lines.append("")
    lines.append(f"share of samples within 3 component std of a mode (dense {dense['high_quality_3sd']:.3f}); "
                 "the capture criterion above is lenient (a standard normal captures all 6)")
    lines.append(hdr)
    for i, s in enumerate(sp):
        vals = [results["methods"][m]["rounds"][i]["high_quality_3sd"] for m in methods]
        lines.append(f"{s:8.3f} ({sp_all[i]:.3f}) | " + " ".join(f"{v:10.3f}" for v in vals))
    lines.append("")
    lines.append("training loss right after pruning minus before (nats) / retraining steps until the loss "
                 "(8-step moving average) is back within recover_tol of before ('-': not within the round); "
                 "last row: mean steps, counting the full round where not recovered")
    lines.append(hdr)
    for i, s in enumerate(sp):
        cells = []
        for m in methods:
            r = results["methods"][m]["rounds"][i]
            rec = "-" if r["recovery_steps"] is None else str(r["recovery_steps"])
            cells.append(f"{r['loss_after_prune'] - r['loss_before_prune']:+6.3f}/{rec:>3}")
        lines.append(f"{s:8.3f} ({sp_all[i]:.3f}) | " + " ".join(f"{c:>10}" for c in cells))
    means = []
    for m in methods:
        rs = results["methods"][m]["rounds"]
        steps = [r["recovery_steps"] if r["recovery_steps"] is not None else r["steps"] for r in rs]
        means.append(sum(steps) / len(steps))
    lines.append(f"{'mean steps':>16} | " + " ".join(f"{v:10.1f}" for v in means))
    hm = [m for m in methods if "hess_top" in results["methods"][m]["rounds"][0]]
    if hm:
        d = results["dense"]
        lines.append("")
        lines.append(f"NLL Hessian over the unpruned weights (256 val points): top eigenvalue / trace "
                     f"(dense {d['hess_top']:.1f} / {d['hess_trace']:.1f})")
        lines.append(f"{'sparsity':>16} | " + " ".join(f"{m:>21}" for m in hm))
        for i, s in enumerate(sp):
            cells = [f"{results['methods'][m]['rounds'][i]['hess_top']:9.1f} / "
                     f"{results['methods'][m]['rounds'][i]['hess_trace']:9.1f}" for m in hm]
            lines.append(f"{s:8.3f} ({sp_all[i]:.3f}) | " + " ".join(f"{c:>21}" for c in cells))
    with open(out / "nll_vs_sparsity.csv", "w", newline="") as f:
        csv.writer(f).writerows([["sparsity", "sparsity_all", *methods], *rows_nll])
    with open(out / "modes_vs_sparsity.csv", "w", newline="") as f:
        csv.writer(f).writerows([["sparsity", "sparsity_all", *methods], *rows_modes])
    return "\n".join(lines)


def _plots(out: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]
    for key, fname, ylabel in (("test_nll", "nll_vs_sparsity.png", "test NLL (nats)"),
                               ("modes", "modes_vs_sparsity.png", f"modes captured (of {dense['n_modes']})")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, res in results["methods"].items():
            xs = [100 * r["sparsity"] for r in res["rounds"]]
            ax.plot(xs, [r[key] for r in res["rounds"]], marker="o", ms=3, label=m)
        ref = dense["test_nll"] if key == "test_nll" else dense["modes"]
        ax.axhline(ref, color="k", ls="--", lw=1, label="dense")
        if key == "test_nll":
            ax.axhline(dense["entropy_floor"], color="gray", ls=":", lw=1, label="entropy floor")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"pruned CNF on {DATASET}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--keep", default="0.8,0.6,0.4,0.3,0.2,0.1,0.05,0.02",
                   help="keep ratios of the cascade (default: a coarse version of so.prune.default_schedule)")
    p.add_argument("--retrain-epochs", type=int, default=5)
    p.add_argument("--n-score", type=int, default=4, help="batches averaged by the importance measures")
    p.add_argument("--n-samples", type=int, default=5000)
    p.add_argument("--recover-tol", type=float, default=0.01)
    p.add_argument("--hessian", default="magnitude",
                   help="Hessian spectrum at every checkpoint of this method ('all', 'none'; ~3 s each)")
    p.add_argument("--out", default="runs/prune_flows")
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.n_samples = 1024, 1000, 1000
        args.dense_epochs, args.retrain_epochs, args.keep = 4, 1, "0.5,0.2"
        args.dense_cache = None
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in so.prune.MEASURES:
            p.error(f"unknown method {m!r}; choose from {sorted(so.prune.MEASURES)}")
    keep = [float(k) for k in args.keep.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    data = flow_data(args)
    dense, dense_info = dense_flow(args, data)
    cov = D.mode_coverage(_samples(dense, args.n_samples), DATASET)
    results: dict[str, Any] = {
        "config": vars(args),
        "dense": {**dense_info, "test_nll": test_nll(dense, data["test"]),
                  **(hessian(dense, data) if args.hessian != "none" else {}),
                  "entropy_floor": D.true_entropy(DATASET), "modes": cov["modes_captured"],
                  "high_quality_3sd": cov["high_quality"][cov["ks"].index(3.0)],
                  "n_modes": cov["n_modes"]},
        "methods": {},
    }
    for m in methods:
        results["methods"][m] = run_method(m, dense, args, data, keep)
        print(f"{m}: {results['methods'][m]['wall_s']:.0f} s", file=sys.stderr)
    results["wall_s"] = time.perf_counter() - t_start
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2, default=str)
    table = _write_tables(out, results)
    _plots(out, results)
    print(f"\nflow pruning on {DATASET}: CNF {args.depth}x{args.width} sigmoid, retrain "
          f"{args.retrain_epochs} epochs x {math.ceil(args.n_train / args.retrain_batch)} steps per round "
          f"(lr {args.retrain_lr:g}, batch {args.retrain_batch}), scope {args.scope}, "
          f"{'all layers' if args.prune_io else 'hidden layers'}, "
          f"dense {'(cached) ' if dense_info.get('cached') else ''}{dense_info['steps']} steps")
    print(table)
    print(f"\nwall time {results['wall_s']:.0f} s (torch threads {torch.get_num_threads()}); files in {out}")
    return 0


def _samples(model: CNF, n: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return model.sample(n)


if __name__ == "__main__":
    sys.exit(main())
