"""Markdown tables of the ICP head-to-head from bench/icp_compare.py's JSON files.

    python bench/icp_table.py runs/icp_grid/*.json            # summary + per-seed rows
    python bench/icp_table.py runs/icp_grid/*.json --summary  # the mean table only

The summary groups the runs by task, schedule and retraining budget and reports, per rule, the
mean over seeds of the total retraining epochs and the final test metric, the paired difference
to plain IMP (same seed, same dense model), and whether the issue's target holds for the
connectivity rule: >= 30% fewer epochs than IMP and a final metric within 0.05 nats (flow) or
0.5 accuracy points (classifiers) of IMP's, both on the seed means.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

TASKS = {"flow": ("gaussians flow, 90%", "NLL", 0.05, False),
         "clf": ("concentric clf, 95%", "acc %", 0.5, True),
         "digits": ("digits clf, 95%", "acc %", 0.5, True)}
SHORT = {"consistent": "cons", "recovered": "recov", "budget": "budget"}


def load(paths: list[str]) -> list[dict[str, Any]]:
    """One record per (file, rule): the cell's keys, the seed, and the rule's result."""
    records = []
    for path in paths:
        blob = json.loads(Path(path).read_text())
        cfg = blob["config"]
        flow = cfg["task"] == "flow"
        budget = (cfg["retrain_epochs"], cfg["final_epochs"]) if flow else \
            (cfg["clf_retrain_epochs"], cfg["clf_final_epochs"])
        schedule = f"pq (eta_r={cfg['pq_eta']})" if cfg["schedule"] == "pq" else "geometric"
        for res in blob["results"]:
            records.append({"task": cfg["task"], "schedule": schedule, "budget": budget, "seed": cfg["seed"],
                            "dense": blob["dense_test"], **res})
    return records


def fmt_budget(budget: tuple[int, int]) -> str:
    return f"{budget[0]}/{budget[1]}"


def summary(records: list[dict[str, Any]]) -> list[str]:
    cells: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        cells[(r["task"], r["schedule"], r["budget"])][r["rule"]][r["seed"]] = r
    lines = ["| task | schedule | epochs/round (final) | rule | seeds | epochs | vs IMP | final test | vs IMP "
             "(paired) | stop reasons (all rounds) | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(cells, key=lambda k: (list(TASKS).index(k[0]), k[1], k[2])):
        task, schedule, budget = key
        label, _, tol, higher = TASKS[task]
        imp = cells[key].get("imp", {})
        for rule in ("imp", "discrepancy", "connectivity"):
            runs = cells[key].get(rule)
            if not runs:
                continue
            seeds = sorted(runs)
            epochs = statistics.mean(runs[s]["epochs"] for s in seeds)
            test = [runs[s]["test"] for s in seeds]
            spread = f" ± {statistics.stdev(test):.3f}" if len(test) > 1 else ""
            paired = [runs[s]["test"] - imp[s]["test"] for s in seeds if s in imp]
            imp_epochs = statistics.mean(imp[s]["epochs"] for s in seeds if s in imp) if paired else None
            saved = "" if rule == "imp" or imp_epochs is None else f"{epochs / imp_epochs - 1:+.0%}"
            delta = "" if rule == "imp" or not paired else f"{statistics.mean(paired):+.3f}"
            reasons = Counter()
            for s in seeds:
                reasons.update({SHORT[k]: v for k, v in runs[s]["reasons"].items()})
            verdict = ""
            if rule == "connectivity" and paired and imp_epochs is not None:
                d = statistics.mean(paired)
                ok = epochs <= 0.7 * imp_epochs and (d >= -tol if higher else d <= tol)
                verdict = "met" if ok else "missed"
            lines.append(f"| {label} | {schedule} | {fmt_budget(budget)} | {rule} | {','.join(map(str, seeds))} | "
                         f"{epochs:.2f} | {saved} | {statistics.mean(test):.3f}{spread} | {delta} | "
                         f"{' '.join(f'{k} {v}' for k, v in sorted(reasons.items()))} | {verdict} |")
    return lines


def per_seed(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| task | schedule | epochs/round (final) | seed | dense | rule | epochs | wall s | final test | "
             "stop reasons (rounds in order; last = final round) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"imp": 0, "discrepancy": 1, "connectivity": 2}
    for r in sorted(records, key=lambda r: (list(TASKS).index(r["task"]), r["schedule"], r["budget"], r["seed"],
                                            order[r["rule"]])):
        stops = " ".join(SHORT[rr["stop_reason"]] for rr in r["rounds"])
        lines.append(f"| {TASKS[r['task']][0]} | {r['schedule']} | {fmt_budget(r['budget'])} | {r['seed']} | "
                     f"{r['dense']:.4f} | {r['rule']} | {r['epochs']:.2f} | {r['wall_s']:.1f} | {r['test']:.4f} | "
                     f"{stops} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="JSON files written by bench/icp_compare.py --json")
    p.add_argument("--summary", action="store_true", help="the mean table only")
    args = p.parse_args(argv)
    records = load(args.files)
    print("\n".join(summary(records)))
    if not args.summary:
        print()
        print("\n".join(per_seed(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
