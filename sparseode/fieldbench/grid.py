"""Which cells the field benchmark runs, and how long that should take.

A cell is (field, batch, task); each cell yields one row per density. Named grids:

* ``full``: issue 16's whole grid, every field of ``ARCHS`` x densities 0.5, 0.1, 0.05, 0.02 x
  batch 1000 and 10000 x every task (128 rows);
* ``issue`` (default): ``full`` less the 2 -> 1024x3 field's CNF tasks at batch 10000 (12 rows),
  which alone would take longer than the rest together on a 2-core CPU (one dense training step
  there costs tens of seconds and every density needs its own reference run). Estimated for a
  quiet 2-core machine (:func:`estimate_seconds`): ~8 min, against ~25 min for ``full``;
* ``quick``: the toy and POWER fields at density 0.1 and 0.02, batch 1000 (a sanity run, < 1 min).

``--archs/--densities/--batches/--tasks`` narrow the grid they are given with.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from sparseode.benchmark import FIELDS, FieldSpec
from sparseode.fieldbench.tasks import TASKS
from sparseode.models import MLPVectorField

ARCHS = ("toy64", "wide256", "wide1024", "power")
DENSITIES = (0.5, 0.1, 0.05, 0.02)
BATCHES = (1000, 10000)


@dataclass(frozen=True)
class Grid:
    """Fields x densities x batches x tasks, less the ``excluded`` (field, batch, task) cells."""

    archs: tuple[str, ...]
    densities: tuple[float, ...]
    batches: tuple[int, ...]
    tasks: tuple[str, ...]
    excluded: frozenset = field(default_factory=frozenset)

    def cells(self) -> list[tuple[str, int, str]]:
        """The (field, batch, task) cells to run, in run order."""
        return [c for c in itertools.product(self.archs, self.batches, self.tasks) if c not in self.excluded]

    def left_out(self) -> list[tuple[str, int, str]]:
        return [c for c in itertools.product(self.archs, self.batches, self.tasks) if c in self.excluded]

    def narrowed(self, archs: Sequence[str] | None = None, densities: Sequence[float] | None = None,
                 batches: Sequence[int] | None = None, tasks: Sequence[str] | None = None) -> "Grid":
        """This grid restricted to the given values (None: keep)."""
        return Grid(tuple(archs or self.archs), tuple(densities or self.densities), tuple(batches or self.batches),
                    tuple(tasks or self.tasks), self.excluded)


_BIG = frozenset((("wide1024", 10000, task) for task in ("log_prob", "sample", "train")))
GRIDS = {
    "full": Grid(ARCHS, DENSITIES, BATCHES, TASKS),
    "issue": Grid(ARCHS, DENSITIES, BATCHES, TASKS, _BIG),
    "quick": Grid(("toy64", "power"), (0.1, 0.02), (1000,), TASKS),
}
WHY_LEFT_OUT = ("the 2 -> 1024x3 field's CNF tasks at batch 10000 would take longer than the rest of the "
                "grid together (run them with --grid full)")

# --- the time estimate ---------------------------------------------------------------------------
#: B's cost relative to A's (its dense training backward is slower than autograd's BLAS calls).
B_FACTOR = {"forward": 1.0, "log_prob": 1.0, "sample": 1.0, "train": 1.5}


def task_factor(task: str, dim: int, steps: int) -> float:
    """A's cost of ``task`` in units of one dense forward of every flow's field at the same batch:
    a CNF task makes 4 x ``steps`` evaluations per flow; the autograd trace adds ~0.9 of a forward
    per dimension to each, and training triples that (fitted to quiet 2-core runs of the toy and
    2 -> 256x3 fields: log_prob ~45x, sample ~17x, train ~130x a forward)."""
    nfe = 4 * steps
    return {"forward": 1.0, "sample": nfe, "log_prob": nfe * (1 + 0.9 * dim),
            "train": 3 * nfe * (1 + 0.9 * dim)}[task]


def _sparse_share(task: str, density: float) -> float:
    """A rough sparse/dense cost ratio (overheads keep it far above the density)."""
    return 0.5 + 0.8 * density if task == "train" else 0.25 + 0.75 * density


def dense_forward_seconds(spec: FieldSpec, batch: int, repeats: int = 3) -> float:
    """One dense forward of every flow's field at ``batch`` (best of ``repeats``): the calibration."""
    torch.manual_seed(0)
    fields = [MLPVectorField(spec.dim, spec.hidden, time=spec.time, activation="tanh") for _ in range(spec.flows)]
    x, t = torch.randn(batch, spec.dim), torch.tensor(0.5)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for f in fields:
                f(t, x)
            best = min(best, time.perf_counter() - t0)
    return best


def _timed_cost(call: float, min_run_time: float, min_repeats: int) -> float:
    return max(min_run_time, call * min_repeats)


def estimate_seconds(grid: Grid, steps: int, min_run_time: float, min_repeats: int,
                     forward_seconds: dict[tuple[str, int], float]) -> float:
    """Predicted wall time of ``grid``: per cell, A runs once per density (the reference) and is
    timed once, B is checked and timed once, the sparse form is checked and timed per density;
    call costs from ``forward_seconds[(field, batch)]`` (:func:`dense_forward_seconds`) times
    :func:`task_factor`. Crude: within ~2x."""
    total = 0.0
    for arch, batch, task in grid.cells():
        a = forward_seconds[(arch, batch)] * task_factor(task, FIELDS[arch].dim, steps)
        b = a * B_FACTOR[task]
        total += len(grid.densities) * a + _timed_cost(a, min_run_time, min_repeats)
        total += b + _timed_cost(b, min_run_time, min_repeats)
        for density in grid.densities:
            s = a * _sparse_share(task, density)
            total += s + _timed_cost(s, min_run_time, min_repeats)
    return total


def calibrate(grid: Grid) -> dict[tuple[str, int], float]:
    """:func:`dense_forward_seconds` of every (field, batch) the grid runs."""
    pairs: Iterable[tuple[str, int]] = sorted({(arch, batch) for arch, batch, _ in grid.cells()})
    return {(arch, batch): dense_forward_seconds(FIELDS[arch], batch) for arch, batch in pairs}
