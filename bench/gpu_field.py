"""GPU benchmark of the fused field (``sparseode::mlp_field`` on its Triton kernel, kernels/field.py)
against the same pruned field run densely with cuBLAS.

Fields (sparseode.benchmark.FIELDS): toy 2 -> 64x3, 2 -> 256x3, 2 -> 1024x3 (tanh) and one POWER-
sized 6 -> 60x3 concatsquash flow; every prunable layer keeps the largest-magnitude ``density``
share. Tasks, each timed with ``triton.testing.do_bench`` (median, ms) after its values are checked:

  forward  f(t, z), no trace:            dense  = the masked dense field (nn.Linear layers, cuBLAS)
  exact    f and the exact trace:        A      = dense field + autograd trace (d VJPs), FFJORD-style
  train    loss(f, trace) backward:      A      = the same with create_graph and one backward

"fused" is the sparsified field through one op call (forward and exact), and through the op's
autograd (train: the hand-written backward on CUDA tensors). A row whose values (or, for train, the
state gradient) differ from the dense field's by more than --rtol is reported as failing and not
timed; a row that raises is reported with its error, and the run goes on. tf32 stays off unless
--tf32. Prints a table (time and speedup over the dense baseline beside the FLOP ratio), writes JSON
and markdown named after the device:

    python bench/gpu_field.py --out bench/results            # ~2 min on an H100
    python bench/gpu_field.py --fields toy64 --densities 0.1 --batches 1000 --dry-run
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from sparseode.benchmark import FIELDS, environment, flop_ratio, make_fields
from sparseode.nn.convert import sparsify

TASKS = ("forward", "exact", "train")
DEFAULT_FIELDS = ("toy64", "wide256", "wide1024", "power")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fields", nargs="+", choices=tuple(FIELDS), default=list(DEFAULT_FIELDS))
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.02])
    p.add_argument("--batches", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--rtol", type=float, default=1e-4, help="value check, relative to the largest value")
    p.add_argument("--tf32", action="store_true", help="allow tf32 for float32 (dense and fused)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--out", help="folder for gpu-field-<device>.{json,md}")
    p.add_argument("--dry-run", action="store_true", help="list the rows and exit (no GPU needed)")
    args = p.parse_args(argv)
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            p.error(f"densities must lie in (0, 1], got {d}")
    for b in args.batches:
        if b < 1:
            p.error(f"batches must be >= 1, got {b}")
    return args


def device_slug(name: str) -> str:
    """A file-name-safe device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# --- the timed functions -----------------------------------------------------------------------------
def _dense_parts(field: torch.nn.Module, t: Tensor) -> tuple[list[Tensor], list, list]:
    """The masked dense field as the op's arguments (dense weights), for the reference."""
    from sparseode.nn import fused_field as ff

    weights, patterns, scales, shifts = ff.field_arguments(field, t)
    return ff.dense_weights(weights, patterns, field.dim), scales, shifts


def _autograd_field(weights: list[Tensor], scales: list, shifts: list, activation: str,
                    z: Tensor) -> Tensor:
    from sparseode.activations import ACTIVATIONS

    act, h = ACTIVATIONS[activation], z
    for i, w in enumerate(weights):
        h = h @ w.t()
        h = h * scales[i] if scales[i] is not None else h
        h = h + shifts[i] if shifts[i] is not None else h
        h = act(h) if i + 1 < len(weights) else h
    return h


def _autograd_trace(f: Tensor, z: Tensor, create_graph: bool) -> Tensor:
    term = torch.zeros_like(z[:, 0])
    for i in range(z.shape[1]):
        (g,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        term = term + g[:, i]
    return term


def make_tasks(dense: torch.nn.Module, sparse: torch.nn.Module, z: Tensor, t: Tensor
               ) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """task -> (baseline, fused): each returns the (f, trace) or the gradient of z that is checked."""
    from sparseode.nn import fused_field as ff

    dw, ds, dc = _dense_parts(dense, t)
    act = dense.activation

    def dense_forward():
        with torch.no_grad():
            return _autograd_field(dw, ds, dc, act, z), None

    def fused_forward():
        with torch.no_grad():
            return ff.fused_field(sparse, t, z, None)[0], None

    def a_exact():
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            f = _autograd_field(dw, ds, dc, act, zz)
            return f.detach(), _autograd_trace(f, zz, create_graph=False).detach()

    def fused_exact():
        with torch.no_grad():
            return ff.fused_field(sparse, t, z, "exact")

    def a_train():
        zz = z.detach().requires_grad_(True)
        f = _autograd_field(dw, ds, dc, act, zz)
        loss = 0.5 * (f * f).sum() - _autograd_trace(f, zz, create_graph=True).sum()
        (g,) = torch.autograd.grad(loss, zz)
        return g, None

    def fused_train():
        zz = z.detach().requires_grad_(True)
        f, term = ff.fused_field(sparse, t, zz, "exact")
        loss = 0.5 * (f * f).sum() - term.sum()
        (g,) = torch.autograd.grad(loss, zz)
        return g, None

    return {"forward": (dense_forward, fused_forward), "exact": (a_exact, fused_exact),
            "train": (a_train, fused_train)}


def _rel_error(got: tuple, want: tuple) -> float:
    err = 0.0
    for g, w in zip(got, want):
        if w is None:
            continue
        scale = float(w.abs().max().clamp_min(1e-12))
        err = max(err, float((g.double() - w.double()).abs().max()) / scale)
    return err


def run_row(spec_name: str, density: float, batch: int, tasks: Sequence[str], args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    import triton.testing

    spec = FIELDS[spec_name]
    _, pruned = make_fields(spec, density)
    sparse = sparsify(pruned[0], format="csr").cuda()  # converted on the CPU, where the masks were made
    dense = pruned[0].cuda()  # the masked dense field: the baseline computes exactly what it computes
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(batch, spec.dim, device="cuda", generator=gen)
    t = torch.tensor(0.3, device="cuda")
    rows = []
    for task, (base, fused) in make_tasks(dense, sparse, z, t).items():
        if task not in tasks:
            continue
        row = {"field": spec_name, "density": density, "batch": batch, "task": task,
               "flop_ratio": round(flop_ratio(pruned[:1]), 2)}
        try:
            err = _rel_error(fused(), base())
            row["rel_error"] = err
            if not err <= args.rtol:
                row["status"] = f"failed check (rel error {err:.2e} > {args.rtol:g})"
            else:
                row["baseline_ms"] = triton.testing.do_bench(base, warmup=args.warmup, rep=args.rep)
                row["fused_ms"] = triton.testing.do_bench(fused, warmup=args.warmup, rep=args.rep)
                row["speedup"] = row["baseline_ms"] / row["fused_ms"]
                row["status"] = "ok"
        except Exception as err:  # a first GPU run records what broke and goes on
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    head = f"{row['field']:>9} d{row['density']:<5g} b{row['batch']:<6} {row['task']:<8}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status', 'dry-run')}"
    return (f"{head} baseline {row['baseline_ms']:8.3f} ms  fused {row['fused_ms']:8.3f} ms  "
            f"{row['speedup']:6.2f}x  (FLOP ratio {row['flop_ratio']:.1f}, rel err {row['rel_error']:.1e})")


def markdown(rows: list[dict[str, Any]], env: dict[str, str]) -> str:
    lines = [f"Fused field on {env.get('device', '?')} (torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}); baseline: dense cuBLAS field (forward) / FFJORD-style A (exact, train)", "",
             "| field | density | batch | task | baseline ms | fused ms | speedup | FLOP ratio | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        cells = [r["field"], f"{r['density']:g}", str(r["batch"]), r["task"],
                 f"{r['baseline_ms']:.3f}" if ok else "-", f"{r['fused_ms']:.3f}" if ok else "-",
                 f"{r['speedup']:.2f}x" if ok else "-", f"{r['flop_ratio']:.1f}", r.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    grid = list(itertools.product(args.fields, args.densities, args.batches))
    if args.dry_run:
        print(f"dry run: {len(grid)} fields x {len(args.tasks)} tasks")
        for f, d, b in grid:
            print(f"  {f} d{d:g} b{b}: {' '.join(args.tasks)}")
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu_field.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from sparseode.nn import fused_field as ff

    ok, why = ff.op_available()
    if not ok:
        print(f"no fused field op: {why}", file=sys.stderr)
        return 2
    from sparseode.kernels import field_register

    field_register.register()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    env = environment()
    print(f"device: {env.get('device')}  torch {env['torch']}  triton {env['triton']}  tf32 {args.tf32}")
    rows = [r for f, d, b in grid for r in run_row(f, d, b, args.tasks, args)]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"gpu-field-{device_slug(env.get('device', 'gpu'))}"
        stem.with_suffix(".json").write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows},
                                                        indent=1))
        stem.with_suffix(".md").write_text(markdown(rows, env))
        print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
