"""Issue 16's field benchmark: a pruned MLP vector field through the fused field op against dense
torch / FFJORD-style A and against B, every row checked against the masked dense model first.

Fields: toy 2 -> 64x3, 2 -> 256x3, 2 -> 1024x3 (tanh, autonomous) and the POWER-sized 6 -> 60x3
concatsquash field (5 stacked flows); the hidden-to-hidden layers pruned by magnitude to each
density and stored as CSR. Tasks: one field evaluation ``forward``, CNF ``log_prob`` (exact
trace), ``sample`` and one training step ``train`` (loss, backward, Adam step); CNF tasks solve
with fixed-step rk4 (``--steps`` steps per flow, so every compared form makes the same number of
evaluations, recorded per row as ``nfe``). Forms compared (same weights):

  A       the masked dense model in plain ``nn.Linear`` layers with FFJORD's autograd trace
          (for ``forward``: plain dense torch)
  B       the same dense weights through this product's fused field op (its dense path)
  sparse  ``sparsify(format="csr")`` of the pruned field, through the fused field op

Ratios are A's (or B's) median time over the sparse form's, from the same run (> 1: faster);
beside them the FLOP ratio (dense multiply-adds of the field over the kept ones: the ceiling of
what sparsity buys). Run as ``python bench/field.py`` or ``sparseode bench field``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from sparseode.fieldbench.grid import ARCHS, GRIDS, WHY_LEFT_OUT, Grid, calibrate, estimate_seconds
from sparseode.fieldbench.report import markdown_table, metadata, output_stem, progress_line, table_from_json, write
from sparseode.fieldbench.sweep import Settings, run_grid
from sparseode.fieldbench.tasks import TASKS, CheckFailed

__all__ = ["add_arguments", "main", "run_from_args"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _density(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a density must be in (0, 1], got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options on ``p`` (``bench/field.py`` and ``sparseode bench field``)."""
    p.add_argument("--grid", choices=sorted(GRIDS), default="issue",
                   help=f"named grid (sparseode.fieldbench.grid); issue = full less: {WHY_LEFT_OUT}")
    p.add_argument("--quick", action="store_true",
                   help="same as --grid quick (toy and POWER, 2 densities, batch 1000, < 1 min)")
    p.add_argument("--archs", nargs="+", choices=ARCHS, help="narrow the grid to these fields")
    p.add_argument("--densities", nargs="+", type=_density, help="narrow the grid to these densities")
    p.add_argument("--batches", nargs="+", type=_positive_int, help="narrow the grid to these batch sizes")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="narrow the grid to these tasks")
    p.add_argument("--steps", type=_positive_int, default=4, help="fixed rk4 steps per flow (NFE = 4 x steps)")
    p.add_argument("--min-run-time", type=_seconds, default=0.5, help="seconds of timed calls per form and row")
    p.add_argument("--min-repeats", type=_positive_int, default=1, help="timed calls per form and row, at least")
    p.add_argument("--max-repeats", type=_positive_int, default=100, help="timed calls per form and row, at most")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (None: torch's setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.add_argument("--out-dir", default="bench/results", help="folder for the JSON, CSV and markdown files")
    p.add_argument("--name", default=None,
                   help="file stem (None: field-<grid>-cpu-<machine>-<threads>threads, grid 'custom' if narrowed)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the JSON here (the CSV and markdown beside it), instead of --out-dir/--name")
    p.add_argument("--dry-run", action="store_true", help="print the cells and the time estimate, run nothing")
    p.add_argument("--table", metavar="JSON", nargs="+", default=None,
                   help="print the markdown table of earlier runs' JSON files (rows in order) and exit")


def _grid(args: argparse.Namespace) -> tuple[str, Grid]:
    name = "quick" if args.quick else args.grid
    narrowing = dict(archs=args.archs, densities=args.densities, batches=args.batches, tasks=args.tasks)
    if any(v is not None for v in narrowing.values()):
        return "custom", GRIDS[name].narrowed(**narrowing)
    return name, GRIDS[name]


def _options(args: argparse.Namespace) -> dict:
    """The benchmark's own options in ``args`` (a namespace may hold a parent command's too)."""
    probe = argparse.ArgumentParser()
    add_arguments(probe)
    return {a.dest: getattr(args, a.dest) for a in probe._actions if a.dest != "help"}


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark as ``args`` (from :func:`add_arguments`) say; 0 on success, 1 when a
    check failed or nothing was selected."""
    if args.table:
        print(table_from_json(*args.table))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from sparseode.nn import fused_field

    ok, why = fused_field.op_available()
    if not ok:
        print(f"the fused field op is unavailable: {why}", file=sys.stderr)
        return 1
    grid_name, grid = _grid(args)
    settings = Settings(args.steps, args.min_run_time, args.min_repeats, args.max_repeats, args.seed)
    cells = grid.cells()
    if not cells:
        print("no cell selected (all of them are left out by this grid; try --grid full)", file=sys.stderr)
        return 1
    estimate = estimate_seconds(grid, settings.steps, settings.min_run_time, settings.min_repeats, calibrate(grid))
    threads = torch.get_num_threads()
    print(f"# field benchmark, grid {grid_name}: {len(cells)} cells x {len(grid.densities)} densities, "
          f"{threads} threads, torch {torch.__version__}, rk4 x {settings.steps} steps per flow; "
          f"estimated {estimate / 60:.1f} min (within ~2x)", flush=True)
    if grid.left_out():
        cells_out = ", ".join(f"{arch} batch {batch} {task}" for arch, batch, task in grid.left_out())
        print(f"# left out: {cells_out} ({WHY_LEFT_OUT})")
    if args.dry_run:
        return 0
    started, total = time.perf_counter(), len(cells) * len(grid.densities)
    done = iter(range(1, total + 1))
    try:
        rows = run_grid(grid, settings, report=lambda r: print(f"[{next(done)}/{total}] {progress_line(r)}",
                                                               flush=True))
    except CheckFailed as err:
        print(f"check failed, nothing timed past it: {err}", file=sys.stderr)
        return 1
    took = time.perf_counter() - started
    meta = metadata(grid_name, _options(args), asdict(settings), estimate, took, grid.left_out())
    if args.json:
        out_dir, stem = Path(args.json).parent, Path(args.json).stem
    else:
        out_dir, stem = args.out_dir, args.name or output_stem(grid_name, threads)
    paths = write(rows, meta, out_dir, stem)
    print(f"\n{markdown_table(rows)}\n\n# took {took / 60:.1f} min (estimated {estimate / 60:.1f}); wrote "
          + ", ".join(map(str, paths)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/field.py [options]``."""
    parser = argparse.ArgumentParser(prog="bench/field.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
