"""Tables and plot of bench/sparse_flows.py, rebuilt from its CSV files after every cell."""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

CELL_KEYS = ("dataset", "arch", "rule", "seed", "steps", "schedule", "lr")
INTS = {"seed", "steps", "round", "strict_held", "n_modes", "dim"}
TARGETS = "demo gaussians: 90% within +0.03 nats of dense, 98% within +0.10, every mode >= 80% of its true share; " \
          "paper arch: NLL at 50-80% sparsity no worse than dense"


def _value(key: str, text: str) -> Any:
    if key in INTS:
        return int(text) if text not in ("", "None") else None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text if text != "" else None


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a results CSV with numbers parsed (empty list when the file does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    for r in rows:  # files written before schedules and LRs were recorded: the paper's, at 1e-3
        r.setdefault("schedule", "sparse_flows")
        r.setdefault("lr", 1e-3)
    return rows


def _header(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def append_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append ``rows`` (the file is rewritten when its header differs from ``fields``); returns them
    as read back."""
    old = read_csv(path)
    same = _header(path) == fields
    with open(path, "a" if same else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if not same:
            w.writeheader()
            w.writerows(old)
        w.writerows(rows)
    return [{k: _value(k, "" if r.get(k) is None else str(r.get(k))) for k in fields} for r in rows]


def has_cell(rows: Iterable[dict[str, Any]], cell: dict[str, Any]) -> bool:
    return any(all(r[k] == cell[k] for k in CELL_KEYS) for r in rows)


def _stat(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"


def _group(rows: list[dict], main: tuple) -> dict[tuple[str, str], list[dict]]:
    """The rows of the main grid (``main`` = (schedule, steps per round, lr)) per (dataset, arch)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if (r["schedule"], r["steps"], r["lr"]) == main:
            out.setdefault((r["dataset"], r["arch"]), []).append(r)
    return out


def _table(rows: list[dict], rules: list[str], key: str, fmt: str) -> list[str]:
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    lines = ["| sparsity | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for keep in keeps:
        at = [r for r in rows if r["keep"] == keep]
        sp = statistics.mean(r["sparsity"] for r in at)
        cells = [_stat([r[key] for r in at if r["rule"] == rule and r[key] is not None], fmt) for rule in rules]
        lines.append(f"| {sp:.1%} | " + " | ".join(cells) + " |")
    return lines


def _seeds(rows: list[dict], rule: str) -> int:
    return len({r["seed"] for r in rows if r["rule"] == rule})


def _verdicts(rows: list[dict], main: tuple) -> list[str]:
    """One line per (rule, dataset, arch, retraining steps per round) of the main schedule and LR."""
    lines = []
    budgets = sorted({r["steps"] for r in rows if (r["schedule"], r["lr"]) == (main[0], main[2])})
    for rule in sorted({r["rule"] for r in rows}):
        for steps in budgets:
            for (ds, arch), grp in sorted(_group(rows, (main[0], steps, main[2])).items()):
                at = [r for r in grp if r["rule"] == rule]
                lines += _verdict(at, f"{ds}/{arch}/{rule}, {steps} steps a round", ds, arch)
    return lines


def _verdict(at: list[dict], label: str, ds: str, arch: str) -> list[str]:
    if not at:
        return []
    lines = []
    if ds == "gaussians" and arch == "demo":
        for keep, limit in ((0.1, 0.03), (0.02, 0.10)):
            hit = [r for r in at if abs(r["keep"] - keep) < 5e-4]
            if hit:
                ok = [r["gap"] <= limit and bool(r["strict_held"] == r["n_modes"]) for r in hit]
                lines.append(f"- {label}, {1 - keep:.0%}: gap <= +{limit:.2f} and every mode >= 80% of its share "
                             f"in {sum(ok)}/{len(ok)} seeds")
    if arch == "paper":
        mid = [r for r in at if 0.45 <= r["sparsity"] <= 0.85]
        if mid:
            ok = sum(r["gap"] <= 0 for r in mid)
            lines.append(f"- {label}: NLL at 50-80% sparsity no worse than dense in {ok}/{len(mid)} evaluated rounds "
                         f"(largest gap {max(r['gap'] for r in mid):+.3f})")
    return lines


def _budget(rows: list[dict], arch: str) -> list[str]:
    """One row per (rule, schedule, steps, lr) run at two or more budgets on gaussians at ``arch``:
    gaps at 90% and 98% and modes held at 98%, mean ± std over the seeds run."""
    at = [r for r in rows if r["dataset"] == "gaussians" and r["arch"] == arch]
    combos = sorted({(r["rule"], r["schedule"], r["steps"], r["lr"]) for r in at})
    lines = ["| rule | schedule | steps/round | lr | seeds | total retraining steps | gap at 50% | gap at 75% | "
             "gap at 90% | gap at 98% | modes held at 98% |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rule, schedule, steps, lr in combos:
        if sum(c[0] == rule for c in combos) < 2:
            continue
        cell = [r for r in at if (r["rule"], r["schedule"], r["steps"], r["lr"]) == (rule, schedule, steps, lr)]
        last_round = max(r["round"] for r in cell)
        final = [r for r in cell if r["round"] == last_round]
        gaps = [_stat([r["gap"] for r in cell if abs(r["keep"] - k) < 5e-4 and r["round"] != last_round], "+.3f")
                for k in (0.5, 0.25, 0.1)]
        total = steps * (last_round + 2)  # the final round runs twice the steps
        held = [float(r["strict_held"]) for r in final]
        lines.append(f"| {rule} | {schedule} | {steps} | {lr:g} | {len(final)} | {total} | {' | '.join(gaps)} | "
                     f"{_stat([r['gap'] for r in final], '+.3f')} | {_stat(held, '.1f')}/{final[0]['n_modes']} |")
    return lines if len(lines) > 2 else []


def _hessian(hess: list[dict], rows: list[dict]) -> list[str]:
    """One row per Hessian taken (the dense flow once per dataset/arch/seed), with the NLL gap of
    the same checkpoint."""
    if not hess:
        return []
    gap = {tuple(r[k] for k in CELL_KEYS + ("round",)): r["gap"] for r in rows}
    lines = ["| flow | cascade (rule, schedule, steps/round, lr) | sparsity | NLL gap | kept weights | top eigenvalue "
             "| trace | trace / kept weight |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for h in sorted(hess, key=lambda h: (h["dataset"], h["arch"], h["sparsity"] > 0, h["rule"], h["lr"],
                                         h["sparsity"])):
        flow = f"{h['dataset']}/{h['arch']}/seed {h['seed']}"
        if h["round"] == -1:
            if flow in seen:
                continue
            seen.add(flow)
        cascade = "dense" if h["round"] == -1 else f"{h['rule']}, {h['schedule']}, {h['steps']}, {h['lr']:g}"
        g = gap.get(tuple(h[k] for k in CELL_KEYS + ("round",)))
        lines.append(f"| {flow} | {cascade} | {h['sparsity']:.1%} | {'-' if g is None else f'{g:+.3f}'} | "
                     f"{h['dim']} | {h['hess_top']:.3g} | {h['hess_trace']:.3g} ± {h['hess_trace_se']:.2g} | "
                     f"{h['hess_trace'] / max(h['dim'], 1):.3g} |")
    return lines


def write(out: Path, rows: list[dict], hess: list[dict], args: argparse.Namespace) -> None:
    """``sparse_flows.md`` and ``sparse_flows.png`` from all rows so far."""
    if not rows:
        return
    steps, lr = args.steps, args.retrain_lr
    main = (args.schedule, steps, lr)
    epochs = steps * args.batch / args.n_train
    lines = ["# Sparse Flows study (bench/sparse_flows.py)", "",
             f"Main grid: the {args.schedule} cascade ({len(args.keep)} rounds, keep ratios "
             f"{', '.join(f'{k:g}' for k in args.keep[:6])}{', ...' if len(args.keep) > 6 else ''}), {steps} AdamW "
             f"steps per round (batch {args.batch}, {args.n_train} training points: {epochs:.2f} epochs; the final "
             f"round twice that; a fresh AdamW at lr {lr:g} every round), against the paper's 100 epochs per round: "
             f"{epochs / 100:.1%} of its retraining per round. Dense flows: {args.dense_epochs} epochs. One CPU "
             f"thread, under load from other jobs. Cells: {len({tuple(r[k] for k in CELL_KEYS) for r in rows})}; "
             f"cell wall times {min(r['cell_s'] for r in rows):.0f}-{max(r['cell_s'] for r in rows):.0f} s "
             "(dense training included where it was not cached).", "",
             f"Targets: {TARGETS}.", ""]
    for (ds, arch), grp in sorted(_group(rows, main).items()):
        rules = [r for r in ("lamp", "global", "layer", "snip", "neuron") if any(g["rule"] == r for g in grp)]
        seeds = ", ".join(f"{r} {_seeds(grp, r)}" for r in rules)
        dense = sorted({(g["seed"], g["dense_nll"]) for g in grp})
        lines += [f"## {ds}, {arch} architecture (seeds: {seeds})", "",
                  "dense test NLL " + ", ".join(f"{n:.3f} (seed {s})" for s, n in dense) +
                  (f"; entropy floor {grp[0]['entropy_floor']:.3f}" if not math.isnan(grp[0]["entropy_floor"]) else ""),
                  "", "NLL gap to dense (nats, mean ± std over seeds):", ""]
        lines += _table(grp, rules, "gap", "+.3f")
        if grp[0]["n_modes"] is not None:
            lines += ["", f"strict mode metric: modes (of {grp[0]['n_modes']}) holding >= 80% of their true share:", ""]
            lines += _table(grp, rules, "strict_held", ".1f")
            lines += ["", "lowest held/true share ratio over the modes:", ""]
            lines += _table(grp, rules, "lowest_ratio", ".2f")
        lines.append("")
    verdicts = _verdicts(rows, main)
    if verdicts:
        lines += ["## Against the targets", ""] + verdicts + [""]
    for arch in ("demo", "paper"):
        budget = _budget(rows, arch)
        if budget:
            lines += [f"## Schedules and retraining budgets (gaussians, {arch} architecture, mean ± std over seeds)",
                      ""] + budget + [""]
    hl = _hessian(hess, rows)
    if hl:
        lines += [f"## Hessian of the NLL over the kept weights ({args.hessian_points} validation points, "
                  f"{args.hessian_iters} power "
                  f"iterations, {args.hessian_iters} Hutchinson probes)", ""] + hl + [""]
    (out / "sparse_flows.md").write_text("\n".join(lines))
    _plot(out / "sparse_flows.png", rows, main)


def _budget_points(rows: list[dict], main: tuple, rule: str) -> list[tuple[int, float, float]]:
    """(steps per round, mean gap at 90%, mean gap at 98%) over the seeds of the main schedule's
    ``rule`` cells on gaussians at the demo architecture, at every budget run."""
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        cell = [r for r in rows if (r["dataset"], r["arch"], r["rule"], r["schedule"], r["steps"], r["lr"])
                == ("gaussians", "demo", rule, main[0], steps, main[2])]
        g90 = [r["gap"] for r in cell if abs(r["keep"] - 0.1) < 5e-4]
        g98 = [r["gap"] for r in cell if abs(r["keep"] - 0.02) < 5e-4]
        if g90 and g98:
            out.append((steps, statistics.mean(g90), statistics.mean(g98)))
    return out


def _plot(path: Path, rows: list[dict], main: tuple) -> None:
    from matplotlib.figure import Figure

    groups = sorted(_group(rows, main).items())
    budgets = {rule: _budget_points(rows, main, rule) for rule in ("lamp", "neuron")}
    budgets = {rule: pts for rule, pts in budgets.items() if len(pts) > 1}
    fig = Figure(figsize=(4 * (len(groups) + bool(budgets)), 3.4))
    axes = fig.subplots(1, len(groups) + bool(budgets), squeeze=False)[0]
    for ax, ((ds, arch), grp) in zip(axes, groups):
        for rule in ("lamp", "global", "layer", "snip", "neuron"):
            at = [r for r in grp if r["rule"] == rule]
            keeps = sorted({r["keep"] for r in at}, reverse=True)
            if not keeps:
                continue
            xs = [100 * statistics.mean(r["sparsity"] for r in at if r["keep"] == k) for k in keeps]
            ys = [statistics.mean(r["gap"] for r in at if r["keep"] == k) for k in keeps]
            ax.plot(xs, ys, "o-", ms=3, label=f"{rule} ({_seeds(grp, rule)} seeds)")
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_title(f"{ds}, {arch} arch", fontsize=9)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test NLL - dense (nats)")
        ax.set_yscale("symlog", linthresh=0.05)
        ax.legend(fontsize=7)
    if budgets:
        ax = axes[-1]
        for rule, pts in budgets.items():
            steps = [b[0] for b in pts]
            ax.plot(steps, [b[1] for b in pts], "o-", label=f"{rule}, 90%")
            ax.plot(steps, [b[2] for b in pts], "s-", label=f"{rule}, 98%")
        for target in (0.03, 0.10):
            ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=0.05)
        ax.set_title("gaussians, demo arch: budget (mean over seeds)", fontsize=9)
        ax.set_xlabel("retraining steps per round")
        ax.set_ylabel("test NLL - dense (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
