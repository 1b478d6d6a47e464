"""Run a grid: per (field, batch) build every density's case, then per task check and time.

Order within a (field, batch, task) cell, so that each ratio compares times taken minutes apart
at most: the baselines A (the masked dense model; plain dense torch for ``forward``) and B (the
same dense weights through the fused op) are checked and timed once, on the first density's
weights: their cost does not depend on the weights' values. Then for each density the reference
A runs on that density's weights, the sparse form is checked against it and timed. Every check
call is also the checked form's warm-up; training checks take the Adam step, so that timed steps
find the optimizer's state in place.

Row keys: ``field``, ``dim``, ``hidden``, ``time``, ``flows``, ``density``, ``batch``, ``task``;
``nfe`` (field evaluations of the task, equal for every form: checked); ``flop_ratio``; ``A_ms``,
``B_ms`` (the cell's baselines, the same in each of its rows), ``sparse_ms`` (medians);
``repeats`` (timed calls per form); ``sparse_vs_A`` = A_ms / sparse_ms, ``sparse_vs_B``,
``B_vs_A`` likewise (> 1: the first named is faster); ``max_rel_error`` (the sparse check's worst relative error) and
``B_max_rel_error`` (B's, on the first density); ``wall_s`` (the row's seconds, checks included).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from sparseode.fieldbench.cases import build_case
from sparseode.fieldbench.grid import Grid
from sparseode.fieldbench.tasks import Inputs, Runner, check, reference_result

#: How each form is called in a row (A and "dense torch" are the same model: A in the CNF tasks).
LABELS = {"dense": "A", "ours_dense": "B", "sparse": "sparse"}


@dataclass(frozen=True)
class Timing:
    """What :func:`measure` saw: the median seconds of a call and how many calls were timed."""

    median_s: float
    repeats: int


def measure(fn: Callable[[], object], min_run_time: float, min_repeats: int = 1, max_repeats: int = 100) -> Timing:
    """Call ``fn`` (already warmed up) at least ``min_repeats`` times and until ``min_run_time``
    seconds have passed (at most ``max_repeats`` calls); the median of the calls."""
    times: list[float] = []
    while len(times) < min_repeats or (sum(times) < min_run_time and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), len(times))


@dataclass(frozen=True)
class Settings:
    """How every cell is run: rk4 steps per flow, timing limits, seed."""

    steps: int = 4
    min_run_time: float = 0.5
    min_repeats: int = 1
    max_repeats: int = 100
    seed: int = 0


def _nfe(runner: Runner, task: str) -> int:
    return len(runner.fields) if task == "forward" else runner.cnf.nfe


def _cell(arch: str, batch: int, task: str, runners: dict[float, dict[str, Runner]], densities: tuple[float, ...],
          settings: Settings) -> list[dict]:
    """The rows of one (field, batch, task): one per density."""
    timed = lambda r: measure(r.task(task), settings.min_run_time, settings.min_repeats, settings.max_repeats)
    first = runners[densities[0]]
    started = time.perf_counter()
    want = reference_result(task, first["dense"])
    b_error = check(task, first["ours_dense"], want)
    base = {form: timed(first[form]) for form in ("dense", "ours_dense")}
    nfe = {form: _nfe(first[form], task) for form in base}
    rows = []
    for density in densities:
        forms = runners[density]
        if density != densities[0]:
            want = reference_result(task, forms["dense"])
        error = check(task, forms["sparse"], want)
        sparse = timed(forms["sparse"])
        nfe["sparse"] = _nfe(forms["sparse"], task)
        if len(set(nfe.values())) != 1:
            raise RuntimeError(f"{arch} {task}: the forms took different numbers of evaluations {nfe}")
        case = forms["sparse"].case
        rows.append(dict(
            field=arch, dim=case.spec.dim, hidden=list(case.spec.hidden), time=case.spec.time,
            flows=case.spec.flows, density=density, batch=batch, task=task, nfe=nfe["sparse"],
            flop_ratio=case.flop_ratio, A_ms=base["dense"].median_s * 1e3, B_ms=base["ours_dense"].median_s * 1e3,
            sparse_ms=sparse.median_s * 1e3,
            repeats={"A": base["dense"].repeats, "B": base["ours_dense"].repeats, "sparse": sparse.repeats},
            sparse_vs_A=base["dense"].median_s / sparse.median_s,
            sparse_vs_B=base["ours_dense"].median_s / sparse.median_s,
            B_vs_A=base["dense"].median_s / base["ours_dense"].median_s,
            max_rel_error=error, B_max_rel_error=b_error, wall_s=time.perf_counter() - started))
        started = time.perf_counter()
    return rows


def run_grid(grid: Grid, settings: Settings = Settings(), report: Callable[[dict], None] | None = None) -> list[dict]:
    """Every row of ``grid`` (dicts: times in ms, ratios, FLOP ratio, NFE, check errors, the
    row's wall seconds); ``report(row)`` is called as each row is done. Raises
    ``tasks.CheckFailed`` when a form's values or gradients differ from the masked dense model."""
    rows = []
    cells = grid.cells()
    for arch, batch in dict.fromkeys((a, b) for a, b, _ in cells):
        cases = {d: build_case(arch, d, settings.seed) for d in grid.densities}
        inputs = Inputs.draw(batch, cases[grid.densities[0]].spec.dim, settings.seed)
        runners = {d: {form: Runner(case, form, inputs, settings.steps) for form in LABELS}
                   for d, case in cases.items()}
        for _, _, task in (c for c in cells if c[:2] == (arch, batch)):
            for row in _cell(arch, batch, task, runners, grid.densities, settings):
                rows.append(row)
                if report is not None:
                    report(row)
            if task == "train":
                for forms in runners.values():
                    for runner in forms.values():
                        runner.restore()
        del runners, cases  # free this field's models before the next one's
    return rows
