"""ICP benchmark: the prune-retrain cascade to 90% with and without information-consistency stopping.

    python bench/icp.py                      # gaussians flow and concentric classifier (~10 min here)
    python bench/icp.py --task flow          # one task
    python bench/icp.py --calibrate          # the experiment behind ICP's defaults (see below)
    python bench/icp.py --quick              # smoke test

For each task the dense model is trained once; then the same cascade (`so.prune.iterative`,
global magnitude pruning, keep ratios `so.prune.default_schedule(0.9)`: 25 rounds, each retrained
from the current weights with a fresh AdamW for --retrain-epochs epochs) runs twice: without a
stopping rule, and with `so.prune.ICP(...)` ending every intermediate round as soon as the pruned
network is information-consistent with the network before pruning (the final round always trains
its full budget). Reported: total retraining epochs (and steps) of both, the saving, the final
test NLL (flow; dopri5 at 1e-5) / test accuracy (classifier) of both, wall times, and per round
the epochs spent and the reason the round stopped.

Target: >= 30% fewer total retraining epochs at a final test NLL within 0.05 nats (accuracy within
0.5 points).

--calibrate runs the cascade with ICP checks but tolerances so small that no round stops early,
and prints, over the rounds, the per-check maximum activation discrepancy ``max_l D_l`` and the
largest gradient-ratio deviation ``max_l |R_l - 1|`` right after pruning and at the end of the
full retraining budget: the tolerances are chosen between the two (see the printed proposal).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparseode as so  # noqa: E402
import sparseode.data as D  # noqa: E402
from prune_flows import common_args, dense_flow, flow_data, prune_filter, retrain_fn, test_nll  # noqa: E402
from sparseode.models import ODEClassifier  # noqa: E402
from sparseode.train import evaluate, fit  # noqa: E402


# ----------------------------------------------------------------------------------------------
# tasks: (dense model, fit for a round, steps per epoch, probe, val metric, test metric)
# ----------------------------------------------------------------------------------------------
def flow_task(args: argparse.Namespace) -> dict[str, Any]:
    data = flow_data(args)
    dense, info = dense_flow(args, data)
    half = args.batch_size // 2
    probe = [(data["probe"][:half],), (data["probe"][half:2 * half],)]
    return {
        "name": "gaussians flow", "metric": "test NLL (nats)", "dense": dense, "dense_info": info,
        "fit": retrain_fn(args, data["train"], args.retrain_epochs),
        "final_fit": retrain_fn(args, data["train"], args.final_epochs),
        "prune": {"scope": args.scope, "filter_fn": prune_filter(args)},
        "spe": math.ceil(args.n_train / args.retrain_batch), "probe": probe,
        "val": lambda m: test_nll(m, data["val"]), "test": lambda m: test_nll(m, data["test"]),
        "tolerance": 0.05, "higher_better": False,
    }


def clf_task(args: argparse.Namespace) -> dict[str, Any]:
    xtr, ytr = D.classification("concentric", args.n_clf, seed=1)
    xva, yva = D.classification("concentric", 1000, seed=2)
    xte, yte = D.classification("concentric", 5000, seed=3)
    xpr, ypr = D.classification("concentric", 256, seed=4)
    torch.manual_seed(args.seed)
    model = ODEClassifier(2, (32, 32), 2, augment=1, time="concat", method="rk4",
                          options={"step_size": 0.25})
    cache = Path(args.clf_cache) if args.clf_cache else None
    key = {"n": args.n_clf, "epochs": args.clf_epochs, "seed": args.seed}
    info: dict[str, Any]
    if cache is not None and cache.exists() and torch.load(cache).get("key") == key:
        blob = torch.load(cache)
        model.load_state_dict(blob["state_dict"])
        info = {**blob["info"], "cached": True}
    else:
        t0 = time.perf_counter()
        res = fit(model, (xtr, ytr), epochs=args.clf_epochs, lr=1e-2, batch_size=args.clf_batch,
                  seed=args.seed, progress=not args.no_progress)
        info = {"steps": res.steps, "train_s": time.perf_counter() - t0, "cached": False}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "state_dict": model.state_dict(), "info": info}, cache)

    def _fitter(epochs):
        def _fit(m, callbacks=()):
            return fit(m, (xtr, ytr), epochs=epochs, lr=args.clf_retrain_lr, batch_size=args.clf_batch,
                       seed=args.seed, callbacks=list(callbacks), progress=False)
        return _fit

    acc = lambda x, y: lambda m: 100.0 * evaluate(m, (x, y))["accuracy"]  # noqa: E731
    return {
        "name": "concentric classifier", "metric": "test accuracy (%)", "dense": model, "dense_info": info,
        "fit": _fitter(args.clf_retrain_epochs), "final_fit": _fitter(args.clf_final_epochs),
        "prune": {"scope": "global", "filter_fn": None}, "spe": math.ceil(args.n_clf / args.clf_batch),
        "probe": [(xpr[:128], ypr[:128]), (xpr[128:], ypr[128:])],
        "val": acc(xva, yva), "test": acc(xte, yte), "tolerance": 0.5, "higher_better": True,
    }


def clf_args(p: argparse.ArgumentParser) -> None:
    """The concentric classifier's data size and budgets, read by :func:`clf_task`."""
    p.add_argument("--n-clf", type=int, default=2000)
    p.add_argument("--clf-batch", type=int, default=128)
    p.add_argument("--clf-epochs", type=int, default=15)
    p.add_argument("--clf-retrain-epochs", type=int, default=4)
    p.add_argument("--clf-final-epochs", type=int, default=8)
    p.add_argument("--clf-retrain-lr", type=float, default=3e-3)
    p.add_argument("--clf-cache", default="runs/icp_clf_dense.pt")


def make_icp(args: argparse.Namespace, probe, spe: int, calibrate: bool = False) -> so.prune.ICP:
    return so.prune.ICP(
        "discrepancy", probe=probe,
        tol_info=1e-9 if calibrate else args.tol_info, tol_grad=1e-9 if calibrate else args.tol_grad,
        patience=args.patience, check_every=args.check_every, min_steps=args.min_steps,
        max_epochs=args.max_epochs, steps_per_epoch=spe, n_steps=args.probe_steps)


def cascade(task: dict[str, Any], args: argparse.Namespace, stop) -> tuple[so.prune.PruneHistory, float, float]:
    model = so.prune.clone(task["dense"])
    t0 = time.perf_counter()
    hist = so.prune.iterative(model, task["fit"], target=args.target, method="magnitude", stop=stop,
                              final_fit=task["final_fit"], **task["prune"],
                              evaluate=task["val"] if args.eval_rounds else None,
                              steps_per_epoch=task["spe"], progress=not args.no_progress)
    wall = time.perf_counter() - t0
    return hist, task["test"](model), wall


def _round_table(base: so.prune.PruneHistory, icp: so.prune.PruneHistory) -> str:
    lines = [f"{'round':>5} {'sparsity':>8} | {'epochs':>6} {'val':>8} | {'epochs':>6} {'val':>8} {'stop':>11}"
             f" {'info@stop':>9} {'|R-1|@stop':>10}"]
    for b, r in zip(base.rounds, icp.rounds):
        last = r.checks[-1] if r.checks else {}
        lines.append(f"{r.round:>5} {r.sparsity:8.4f} | {b.epochs:6.2f} {b.val_metric:8.4f} | {r.epochs:6.2f} "
                     f"{r.val_metric:8.4f} {r.stop_reason:>11} {last.get('max_info', math.nan):9.3f} "
                     f"{last.get('max_grad_dev', math.nan):10.3f}")
    return "\n".join(lines)


def run_compare(task: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    base, base_test, base_wall = cascade(task, args, None)
    icp_rule = make_icp(args, task["probe"], task["spe"])
    icp, icp_test, icp_wall = cascade(task, args, icp_rule)
    saving = 1.0 - icp.total_epochs / base.total_epochs
    diff = icp_test - base_test
    worse = -diff if task["higher_better"] else diff
    ok = saving >= 0.30 and worse <= task["tolerance"]
    return {
        "task": task["name"], "metric": task["metric"], "dense_test": task["test"](task["dense"]),
        "base": {"epochs": base.total_epochs, "steps": base.total_steps, "test": base_test, "wall_s": base_wall,
                 "final_sparsity": base[-1].sparsity, "rounds": base.to_dicts()},
        "icp": {"epochs": icp.total_epochs, "steps": icp.total_steps, "test": icp_test, "wall_s": icp_wall,
                "final_sparsity": icp[-1].sparsity, "rounds": icp.to_dicts(),
                "reasons": {k: sum(r.stop_reason == k for r in icp.rounds) for k in
                            ("consistent", "max_epochs", "budget")}},
        "saving": saving, "diff": diff, "pass": ok, "table": _round_table(base, icp),
    }


GRID_INFO = (0.2, 0.25, 0.35, 0.5)
GRID_GRAD = (0.5, 0.75, 1.0, 1.5)


def run_calibrate(task: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rule = make_icp(args, task["probe"], task["spe"], calibrate=True)
    hist, test, wall = cascade(task, args, rule)
    rows = []
    for r in hist.rounds[:-1]:
        c = r.checks
        if not c:
            continue
        rows.append({"round": r.round, "sparsity": r.sparsity,
                     "info": [x["max_info"] for x in c], "grad": [x["max_grad_dev"] for x in c],
                     "r_min": [min(x["grad"].values()) for x in c], "r_max": [max(x["grad"].values()) for x in c],
                     "steps": [x["step"] for x in c], "layers_info": c[-1]["info"], "layers_grad": c[-1]["grad"]})
    first_i = [r["info"][0] for r in rows]
    first_g = [r["grad"][0] for r in rows]
    end_i = [max(r["info"][-2:]) for r in rows]
    end_g = [max(r["grad"][-2:]) for r in rows]

    # replay candidate tolerances on the recorded checks: fraction of the intermediate budget used
    budget = (args.retrain_epochs if "flow" in task["name"] else args.clf_retrain_epochs) * task["spe"]
    grid = {}
    for ti in GRID_INFO:
        for tg in GRID_GRAD:
            for pat in (1, 2):
                used = 0
                for r in rows:
                    streak, stop = 0, budget
                    for s, a, g in zip(r["steps"], r["info"], r["grad"]):
                        streak = streak + 1 if (a < ti and g <= tg) else 0
                        if streak >= pat and s >= args.min_steps:
                            stop = s
                            break
                    used += stop
                grid[f"{ti},{tg},{pat}"] = used / (budget * len(rows))
    return {"task": task["name"], "test": test, "wall_s": wall, "rows": rows,
            "first_info": first_i, "first_grad": first_g, "end_info": end_i, "end_grad": end_g,
            "replay": grid, "budget_steps": budget}


def _print_calibration(c: dict[str, Any]) -> None:
    print(f"\n== calibration: {c['task']} (no early stop; {len(c['rows'])} intermediate rounds, "
          f"{c['wall_s']:.0f} s) ==")
    print(f"{'round':>5} {'sparsity':>8} | max_l D_l: first -> end | R_l range: first -> end   "
          f"(first check at step {c['rows'][0]['steps'][0]}, end = last of {c['budget_steps']} steps)")
    for r in c["rows"]:
        print(f"{r['round']:>5} {r['sparsity']:8.4f} | {r['info'][0]:8.3f} -> {max(r['info'][-2:]):6.3f}  | "
              f"[{r['r_min'][0]:5.2f},{r['r_max'][0]:6.2f}] -> [{r['r_min'][-1]:5.2f},{r['r_max'][-1]:6.2f}]")
    last = c["rows"][len(c["rows"]) // 2]
    print(f"per layer at the end of round {last['round']}: D " +
          ", ".join(f"{k.split('.')[-2] if '.' in k else k}={v:.3f}" for k, v in last["layers_info"].items()) +
          "; R " + ", ".join(f"{v:.2f}" for v in last["layers_grad"].values()))
    med = statistics.median
    print(f"median right after pruning: D {med(c['first_info']):.3f}, |R-1| {med(c['first_grad']):.3f}; "
          f"at the end of the budget: D {med(c['end_info']):.3f}, |R-1| {med(c['end_grad']):.3f}")
    print("replayed on these checks (min_steps as given): fraction of the intermediate budget used")
    print(f"{'tol_info':>8} " + " ".join(f"{'tol_grad=' + str(g) + ' p=' + str(p):>16}" for g in GRID_GRAD for p in (1, 2)))
    for ti in GRID_INFO:
        print(f"{ti:8.2f} " + " ".join(f"{c['replay'][f'{ti},{g},{p}']:16.2f}" for g in GRID_GRAD for p in (1, 2)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--task", choices=("flow", "clf", "both"), default="both")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--retrain-epochs", type=int, default=3, help="flow: epochs per round without ICP")
    p.add_argument("--final-epochs", type=int, default=9, help="flow: epochs of the final round")
    clf_args(p)
    p.add_argument("--eval-rounds", type=int, default=1, help="evaluate the val metric after every round")
    # ICP parameters (defaults = the library's)
    defaults = so.prune.ICP("discrepancy", probe=[(torch.zeros(1),)], loss_fn=lambda m, b: b[0].sum())
    meas = defaults.measure
    p.add_argument("--tol-info", type=float, default=meas.tol_info)
    p.add_argument("--tol-grad", type=float, default=meas.tol_grad)
    p.add_argument("--patience", type=int, default=defaults.patience)
    p.add_argument("--check-every", type=int, default=defaults.check_every)
    p.add_argument("--min-steps", type=int, default=defaults.min_steps)
    p.add_argument("--max-epochs", type=float, default=defaults.max_epochs)
    p.add_argument("--probe-steps", type=int, default=meas.n_steps)
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.n_val, args.dense_epochs, args.retrain_epochs = 1024, 500, 500, 2, 1
        args.n_clf, args.clf_epochs, args.clf_retrain_epochs, args.clf_final_epochs = 256, 2, 1, 1
        args.final_epochs = 1
        args.target, args.dense_cache, args.clf_cache = 0.5, None, None
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tasks = {"flow": [flow_task], "clf": [clf_task], "both": [flow_task, clf_task]}[args.task]
    out: dict[str, Any] = {"config": vars(args), "results": []}
    for make in tasks:
        task = make(args)
        if args.calibrate:
            c = run_calibrate(task, args)
            _print_calibration(c)
            out["results"].append(c)
            continue
        r = run_compare(task, args)
        out["results"].append(r)
        print(f"\n== {r['task']}: cascade to {args.target:.0%} ({len(r['icp']['rounds'])} rounds), "
              f"magnitude, {task['prune']['scope']} scope"
              f"{', hidden layers' if task['prune']['filter_fn'] is not None else ', all layers'} ==")
        print(f"dense {r['metric']}: {r['dense_test']:.4f}")
        print(r["table"])
        print(f"{'':>14} {'epochs':>8} {'steps':>6} {r['metric']:>18} {'wall s':>7}")
        for k in ("base", "icp"):
            v = r[k]
            print(f"{'without ICP' if k == 'base' else 'with ICP':>14} {v['epochs']:8.2f} {v['steps']:>6} "
                  f"{v['test']:18.4f} {v['wall_s']:7.0f}")
        print(f"epochs saved {r['saving']:.1%}; final {r['metric']} difference {r['diff']:+.4f} "
              f"(tolerance {r['task'] and ('0.05 nats' if 'flow' in r['task'] else '0.5 points')}); "
              f"ICP stops {r['icp']['reasons']}; {'PASS' if r['pass'] else 'FAIL'}")
    out["wall_s"] = time.perf_counter() - t0
    print(f"\nwall time {out['wall_s']:.0f} s (torch threads {torch.get_num_threads()})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0 if args.calibrate or args.quick or all(r["pass"] for r in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
