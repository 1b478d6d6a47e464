"""Head-to-head: plain IMP vs ICP("discrepancy") vs ICP("connectivity", as published), per schedule.

    python bench/icp_compare.py --task flow --schedule geometric     # one cell of the table (< 5 min here)
    python bench/icp_compare.py --task clf  --schedule pq
    python bench/icp_compare.py --task clf --calibrate               # connectivity values, no early stop
    python bench/icp_compare.py --quick                              # smoke test

Tasks (the dense models and data of bench/icp.py, cached under runs/): the ``gaussians`` CNF
(4x64 sigmoid field, hidden layers pruned per layer) to 90% sparsity, the ``concentric``
ODE classifier (2-32-32, all layers, global) to 95%, and (``--task digits``) an ODE classifier on
scikit-learn's 8x8 digits (64 -> field 64-64 -> 10, 1100 training images) to 95%. Each cascade is ``so.prune.iterative`` with
global/layer magnitude pruning, retraining with a fresh AdamW each round, the final round always
run to its budget; the stopping rules only shorten intermediate rounds:

* ``imp``: no stopping rule (every round to its budget);
* ``discrepancy``: ``ICP("discrepancy")`` with the library defaults (activation discrepancy and
  gradient-norm ratio against the network before the round's pruning);
* ``connectivity``: ``ICP("connectivity")``, the published rule: ``‖c − c_ref‖₂ < eps_info`` and
  ``‖g − g_ref‖₂/‖g_ref‖₂ < eps_grad`` against the dense network, plus the early exit when the
  probe loss is back at the dense network's.

Schedules: ``geometric`` (``rounds`` equal pruning factors, ``keep_k = (1 − target)^{k/rounds}``)
and ``pq`` (SAP's PQ-index ratio per round, ``so.prune.pq``; at most ``rounds`` rounds, the last
one forced to the target).

Reported per rule: total retraining epochs, wall time, final test NLL (flow, dopri5 at 1e-5) or test
accuracy (classifier), and the per-round stop reasons. Results measured here, the thresholds'
calibration and their reading: bench/results/icp_compare_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparseode as so  # noqa: E402
from icp import clf_args, clf_task, flow_task  # noqa: E402
from prune_flows import common_args  # noqa: E402

RULES = ("imp", "discrepancy", "connectivity")


def digits_task(args: argparse.Namespace) -> dict[str, Any]:
    """8x8 digits (scaled to [0, 1]), ODEClassifier 64 -> field (64, 64) -> 10, all layers, global scope."""
    from sparseode.models import ODEClassifier
    from sparseode.train import evaluate, fit

    X, y = so.data.digits()
    X = X / 16.0
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    tr, va, te, pr = perm[:1100], perm[1100:1350], perm[1350:1697], perm[1697:]
    xtr, ytr = X[tr], y[tr]
    torch.manual_seed(args.seed)
    model = ODEClassifier(64, (64, 64), 10, time="concat", method="rk4", options={"step_size": 0.25})
    cache = Path(args.digits_cache) if args.digits_cache else None
    key = {"epochs": args.digits_epochs, "seed": args.seed}
    if cache is not None and cache.exists() and torch.load(cache).get("key") == key:
        model.load_state_dict(torch.load(cache)["state_dict"])
    else:
        fit(model, (xtr, ytr), epochs=args.digits_epochs, lr=3e-3, batch_size=128, seed=args.seed, progress=False)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "state_dict": model.state_dict()}, cache)

    def _fitter(epochs: int):
        def _fit(m, callbacks=()):
            return fit(m, (xtr, ytr), epochs=epochs, lr=1e-3, batch_size=128, seed=args.seed,
                       callbacks=list(callbacks), progress=False)
        return _fit

    acc = lambda idx: lambda m: 100.0 * evaluate(m, (X[idx], y[idx]))["accuracy"]  # noqa: E731
    return {"name": "digits classifier", "metric": "test accuracy (%)", "dense": model,
            "fit": _fitter(args.clf_retrain_epochs), "final_fit": _fitter(args.clf_final_epochs),
            "prune": {"scope": "global", "filter_fn": None}, "spe": math.ceil(len(tr) / 128),
            "probe": [(X[pr], y[pr])], "val": acc(va), "test": acc(te)}


def make_rule(name: str, task: dict[str, Any], args: argparse.Namespace) -> so.prune.ICP | None:
    common = dict(probe=task["probe"], patience=args.patience, check_every=args.check_every,
                  min_steps=args.min_steps, steps_per_epoch=task["spe"])
    if name == "imp":
        return None
    if name == "discrepancy":
        return so.prune.ICP("discrepancy", **common)
    if args.calibrate:
        return so.prune.ICP("connectivity", eps_info=1e-12, eps_grad=1e-12, early_exit=False,
                            reference=args.reference, **common)
    return so.prune.ICP("connectivity", eps_info=args.eps_info, eps_grad=args.eps_grad,
                        reference=args.reference, early_exit=not args.no_early_exit, **common)


def cascade(task: dict[str, Any], args: argparse.Namespace, rule: str) -> dict[str, Any]:
    model = so.prune.clone(task["dense"])
    stop = make_rule(rule, task, args)
    target = task["target"]
    sched: Any = "pq" if args.schedule == "pq" else None
    t0 = time.perf_counter()
    hist = so.prune.iterative(model, task["fit"], target=target, schedule=sched, rounds=args.rounds,
                              method="magnitude", stop=stop, final_fit=task["final_fit"], **task["prune"],
                              evaluate=task["val"] if args.eval_rounds else None,
                              steps_per_epoch=task["spe"], progress=False,
                              pq_params={"eta_r": args.pq_eta, "gamma": args.pq_gamma} if sched else None)
    wall = time.perf_counter() - t0
    test = task["test"](model)
    rounds = []
    for r in hist.rounds:
        first = r.checks[0] if r.checks else {}
        last = r.checks[-1] if r.checks else {}
        rounds.append({**{k: v for k, v in r.__dict__.items() if k != "checks"},
                       "info_first": first.get("max_info", math.nan), "grad_first": first.get("max_grad_dev", math.nan),
                       "info_last": last.get("max_info", math.nan), "grad_last": last.get("max_grad_dev", math.nan),
                       "n_checks": len(r.checks), "check_steps": [c["step"] for c in r.checks],
                       "check_info": [c["max_info"] for c in r.checks],
                       "check_grad": [c["max_grad_dev"] for c in r.checks]})
    m = stop.measure if stop is not None else None
    thresholds = None if m is None else \
        [m.tol_info, m.tol_grad] if rule == "discrepancy" else [m.eps_info, m.eps_grad]
    return {"rule": rule, "thresholds": thresholds, "epochs": hist.total_epochs, "steps": hist.total_steps, "wall_s": wall, "test": test,
            "final_sparsity": hist[-1].sparsity, "n_rounds": len(hist),
            "reasons": dict(Counter(r.stop_reason for r in hist.rounds)), "rounds": rounds}


GRID_INFO = (0.02, 0.03, 0.05, 0.1, 0.15)
GRID_GRAD = (0.25, 0.5, 0.75, 1.0, 2.0)


def replay(res: dict[str, Any], budget: int, min_steps: int) -> dict[str, float]:
    """Fraction of the intermediate budget candidate thresholds would have used (patience 1),
    replayed on the checks of a run that never stopped early (``--calibrate``)."""
    rows = [r for r in res["rounds"] if not r["final"] and r["n_checks"]]
    out = {}
    for ei in GRID_INFO:
        for eg in GRID_GRAD:
            used = 0
            for r in rows:
                stop = budget
                for s, a, g in zip(r["check_steps"], r["check_info"], r["check_grad"]):
                    if a < ei and g < eg and s >= min_steps:
                        stop = s
                        break
                used += stop
            out[f"{ei},{eg}"] = used / (budget * len(rows)) if rows else math.nan
    return out


def plot_checks(out: dict[str, Any], path: str) -> None:
    """One panel per ICP rule and distance: the distance at every check against the step within
    its round, one line per round (labelled with its sparsity), the rule's threshold dashed."""
    from matplotlib import cm
    from matplotlib.figure import Figure

    results = [r for r in out["results"] if r["rule"] != "imp"]
    fig = Figure(figsize=(9, 3.2 * max(1, len(results))))
    axes = fig.subplots(max(1, len(results)), 2, squeeze=False)
    for row, res in zip(axes, results):
        rounds = [rr for rr in res["rounds"] if rr["n_checks"]]
        for k, rr in enumerate(rounds):
            color = cm.viridis(k / max(1, len(rounds) - 1))
            label = f"round {rr['round']}: {rr['sparsity']:.0%}, {rr['stop_reason']}"
            row[0].plot(rr["check_steps"], rr["check_info"], color=color, lw=1, marker=".", label=label)
            row[1].plot(rr["check_steps"], rr["check_grad"], color=color, lw=1, marker=".")
        for ax, threshold in zip(row, res.get("thresholds") or (None, None)):
            if threshold is not None:
                ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold {threshold:g}")
        row[0].legend(fontsize=7)
        row[1].legend(fontsize=7)
        row[0].set_title(f"{res['rule']}: information distance", fontsize=9)
        row[1].set_title(f"{res['rule']}: gradient distance", fontsize=9)
        for ax in row:
            ax.set_xlabel("step within the round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--task", choices=("flow", "clf", "digits"), default="clf")
    p.add_argument("--schedule", choices=("geometric", "pq"), default="geometric")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--rounds", type=int, default=8, help="geometric: rounds; pq: at most this many")
    p.add_argument("--flow-target", type=float, default=0.9)
    p.add_argument("--clf-target", type=float, default=0.95)
    p.add_argument("--retrain-epochs", type=int, default=2, help="flow: epochs per intermediate round")
    p.add_argument("--final-epochs", type=int, default=4, help="flow: epochs of the final round")
    clf_args(p)
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--digits-cache", default="runs/icp_digits_dense.pt")
    p.add_argument("--eval-rounds", type=int, default=0, help="evaluate the val metric after every round")
    meas = so.prune.ConnectivityMeasure()
    p.add_argument("--eps-info", type=float, default=meas.eps_info)
    p.add_argument("--eps-grad", type=float, default=meas.eps_grad)
    p.add_argument("--reference", choices=("dense", "previous"), default=meas.reference)
    p.add_argument("--no-early-exit", action="store_true")
    icp = so.prune.ICP("discrepancy", probe=[(torch.zeros(1),)], loss_fn=lambda m, b: b[0].sum())
    p.add_argument("--patience", type=int, default=icp.patience)
    p.add_argument("--check-every", type=int, default=icp.check_every)
    p.add_argument("--min-steps", type=int, default=icp.min_steps)
    p.add_argument("--pq-eta", type=float, default=0.0)
    p.add_argument("--pq-gamma", type=float, default=1.0)
    p.add_argument("--calibrate", action="store_true", help="connectivity rule only, never stops early")
    p.add_argument("--retrain-seed", type=int, default=None,
                   help="seed of the retraining rounds only (default --seed; the dense model keeps --seed)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: each ICP rule's distances against steps within each round")
    args = p.parse_args(argv)
    args.no_progress = True
    if args.quick:
        args.n_train, args.n_test, args.n_val, args.dense_epochs, args.retrain_epochs = 512, 300, 300, 1, 1
        args.n_clf, args.clf_epochs, args.clf_retrain_epochs, args.clf_final_epochs = 256, 1, 1, 1
        args.final_epochs, args.rounds, args.width, args.depth = 1, 2, 16, 2
        args.dense_cache = args.clf_cache = args.digits_cache = None
        args.digits_epochs = 1
    if args.calibrate:
        args.rules = "connectivity"
    torch.set_num_threads(args.threads)
    task = {"flow": flow_task, "clf": clf_task, "digits": digits_task}[args.task](args)
    if args.retrain_seed is not None:  # the round fits read args.seed when called
        args.seed = args.retrain_seed
    task["target"] = args.flow_target if args.task == "flow" else args.clf_target
    rules = [r for r in args.rules.split(",") if r]
    for r in rules:
        if r not in RULES:
            raise SystemExit(f"unknown rule {r!r}; choose from {RULES}")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"config": vars(args), "task": task["name"], "metric": task["metric"],
                           "dense_test": task["test"](task["dense"]), "results": []}
    for r in rules:
        out["results"].append(cascade(task, args, r))
    out["wall_s"] = time.perf_counter() - t0
    if args.plot:
        plot_checks(out, args.plot)

    print(f"\n== {task['name']} to {task['target']:.0%}, {args.schedule} schedule "
          f"({'<= ' if args.schedule == 'pq' else ''}{args.rounds} rounds), magnitude; "
          f"connectivity eps_info={args.eps_info} eps_grad={args.eps_grad} reference={args.reference} ==")
    print(f"dense {task['metric']}: {out['dense_test']:.4f}")
    print(f"{'rule':>13} {'rounds':>6} {'epochs':>7} {'steps':>6} {'wall s':>7} {task['metric']:>18}  stop reasons")
    for res in out["results"]:
        print(f"{res['rule']:>13} {res['n_rounds']:>6} {res['epochs']:7.2f} {res['steps']:>6} {res['wall_s']:7.1f} "
              f"{res['test']:18.4f}  {res['reasons']}")
    for res in out["results"]:
        if res["rule"] == "imp":
            continue
        print(f"-- {res['rule']}: per round  sparsity  epochs  stop  (info, grad) first check -> last check")
        for rr in res["rounds"]:
            print(f"   {rr['round']:>3} {rr['sparsity']:8.4f} {rr['epochs']:6.2f} {rr['stop_reason']:>11}  "
                  f"({rr['info_first']:.4f}, {rr['grad_first']:.3f}) -> ({rr['info_last']:.4f}, {rr['grad_last']:.3f})"
                  f"  [{rr['n_checks']} checks]")
        inter = [rr for rr in res["rounds"] if not rr["final"] and rr["n_checks"]]
        if inter:
            med = statistics.median
            print(f"   median first check: info {med(r['info_first'] for r in inter):.4f}, grad "
                  f"{med(r['grad_first'] for r in inter):.3f}; last: info {med(r['info_last'] for r in inter):.4f}, "
                  f"grad {med(r['grad_last'] for r in inter):.3f}")
    if args.calibrate:
        budget = (args.retrain_epochs if args.task == "flow" else args.clf_retrain_epochs) * task["spe"]
        grid = replay(out["results"][0], budget, args.min_steps)
        out["replay"] = grid
        print("replayed thresholds (patience 1): fraction of the intermediate budget used")
        print(f"{'eps_info':>8} " + " ".join(f"{'eps_grad=' + str(g):>13}" for g in GRID_GRAD))
        for ei in GRID_INFO:
            print(f"{ei:8.2f} " + " ".join(f"{grid[f'{ei},{g}']:13.2f}" for g in GRID_GRAD))
    print(f"wall time {out['wall_s']:.0f} s (torch threads {torch.get_num_threads()})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
