"""Prune-retrain schedules: the iterative cascade used to prune flows, and one-shot pruning.

One round of :func:`iterative` (Liebenwein et al. 2021, "Sparse flows"; Frankle & Carbin 2019):

1. (with ``stop``) record the reference flows of the current network (``stop.reference``),
2. score the current network (``importance(method)``) and prune to the round's sparsity
   ``s_k = 1 − keep_k`` (masks compose: nothing pruned earlier comes back),
3. retrain from the current weights with ``fit(model, callbacks=[...])``; every call builds a new
   optimiser, so the learning-rate schedule restarts; an intermediate round ends early when
   ``stop`` says so, the final round always runs ``final_fit`` (default ``fit``) to its budget,
4. evaluate, record (sparsity, validation metric, steps/epochs, wall time, stop reason) and keep a
   checkpoint (``state_dict`` with the masks).

The default schedule of keep ratios (:func:`default_schedule`): geometric from 0.8 to 0.2 in 20
steps, ``keep_k = 0.8·(0.2/0.8)^(k/19)``, then linear from 0.18 to 0.02 in 9 steps (down to 98%
sparsity); truncated at ``target`` (and ending exactly at it).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sparseode.prune.importance import MEASURES, LossFn, importance
from sparseode.prune.args import check_sparsity as _check_sparsity
from sparseode.prune.granularity import GRANULARITIES
from sparseode.prune.layers import FilterFn
from sparseode.prune.masking import apply
from sparseode.prune.report import sparsity
from sparseode.prune.rewind import rewinding, snapshot_weights

__all__ = ["iterative", "one_shot", "default_schedule", "PruneHistory", "RoundRecord"]

FitFn = Callable[..., Any]


def default_schedule(target: float = 0.98) -> list[float]:
    """Keep ratios of the flow-pruning cascade, truncated at ``1 − target`` (inclusive).

    Geometric 0.8 → 0.2 in 20 steps, then linear 0.18 → 0.02 in 9 steps (29 steps, 98%).
    If ``1 − target`` is not on the grid it is appended as the last keep ratio.
    """
    t = _check_sparsity(target, "target")
    geo = [0.8 * (0.2 / 0.8) ** (k / 19) for k in range(20)]
    lin = [0.18 - 0.02 * k for k in range(9)]
    keep_min = 1.0 - t
    out = [k for k in geo + lin if k >= keep_min - 1e-9]
    if not out or abs(out[-1] - keep_min) > 1e-9:
        out.append(keep_min)
    return [round(k, 12) for k in out]


@dataclass
class RoundRecord:
    """One prune-retrain round."""

    round: int
    target_sparsity: float   # the schedule's sparsity for the round
    sparsity: float          # measured after pruning (all prunable layers)
    val_metric: float        # after retraining (nan if no evaluation)
    steps: int               # optimiser steps of the retraining
    epochs: float            # epochs of the retraining (steps / steps-per-epoch when known)
    time_s: float            # wall time of the round (scoring + pruning + retraining + eval)
    stop_reason: str         # "consistent" | "max_epochs" | "budget" (ran to the fit's end)
    final: bool = False
    checks: list[dict[str, Any]] = field(default_factory=list, repr=False)


@dataclass
class PruneHistory:
    """What :func:`iterative` did; ``checkpoints[k]`` is the state dict after round ``k``."""

    rounds: list[RoundRecord] = field(default_factory=list)
    checkpoints: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)
    dense_metric: float = math.nan

    @property
    def total_epochs(self) -> float:
        return sum(r.epochs for r in self.rounds)

    @property
    def total_steps(self) -> int:
        return sum(r.steps for r in self.rounds)

    @property
    def total_time(self) -> float:
        return sum(r.time_s for r in self.rounds)

    def __len__(self) -> int:
        return len(self.rounds)

    def __getitem__(self, i: int) -> RoundRecord:
        return self.rounds[i]

    def to_dicts(self) -> list[dict[str, Any]]:
        keys = ("round", "target_sparsity", "sparsity", "val_metric", "steps", "epochs", "time_s",
                "stop_reason", "final")
        return [{k: getattr(r, k) for k in keys} for r in self.rounds]

    def table(self) -> str:
        lines = [f"{'round':>5} {'sparsity':>8} {'val':>10} {'epochs':>7} {'steps':>6} {'time_s':>7}  stop"]
        if not math.isnan(self.dense_metric):
            lines.append(f"{'dense':>5} {0.0:8.4f} {self.dense_metric:10.4f}")
        for r in self.rounds:
            lines.append(f"{r.round:>5} {r.sparsity:8.4f} {r.val_metric:10.4f} {r.epochs:7.2f} "
                         f"{r.steps:>6} {r.time_s:7.1f}  {r.stop_reason}")
        lines.append(f"total epochs {self.total_epochs:.2f}, steps {self.total_steps}, "
                     f"time {self.total_time:.1f}s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_schedule(schedule: Sequence[float]) -> list[float]:
    keep = [float(k) for k in schedule]
    if not keep:
        raise ValueError("schedule must hold at least one keep ratio")
    for k in keep:
        if not (0.0 < k <= 1.0):
            raise ValueError(f"schedule holds keep ratios in (0, 1], got {k!r}")
    if any(b > a + 1e-12 for a, b in zip(keep, keep[1:])):
        raise ValueError(f"schedule must be non-increasing keep ratios, got {keep}")
    return keep


def _val_from_result(result: Any) -> float:
    for attr in ("val_metric", "best_val"):
        v = getattr(result, attr, None)
        if isinstance(v, (int, float)) and v is not None:
            return float(v)
    return math.nan


def _epochs_of(result: Any, steps: int, spe: float | None) -> float:
    if spe:
        return steps / spe
    e = getattr(result, "epochs_run", None)
    return float(e) if e is not None else math.nan


def iterative(
    model: nn.Module,
    fit: FitFn,
    target: float = 0.98,
    schedule: Sequence[float] | str | None = None,
    method: str = "magnitude",
    granularity: str = "weight",
    stop: Any = None,
    *,
    rounds: int | None = None,
    loss_fn: LossFn | None = None,
    data: Iterable[Any] | None = None,
    n_batches: int = 8,
    scope: str | None = None,
    block: int | Sequence[int] = (16, 16),
    filter_fn: FilterFn | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    final_fit: FitFn | None = None,
    steps_per_epoch: int | None = None,
    checkpoint_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    pq_params: Mapping[str, float] | None = None,
    rewind: None | str | int = None,
) -> PruneHistory:
    """Prune-retrain cascade: prune, retrain from the current weights, repeat; in place.

    Args:
        model: the (trained, dense or already pruned) model.
        fit: ``fit(model, callbacks=[...]) -> FitResult``-like; retrains ``model`` in place with a
            fresh optimiser and learning-rate schedule (e.g. a ``functools.partial`` of
            :func:`sparseode.train.fit` with its data and budget). The result's ``steps`` (and
            ``epochs_run``, ``val_metric``/``best_val``) are read when present.
        target: final sparsity in [0, 1) (default 0.98).
        schedule: keep ratios, non-increasing in (0, 1]; default :func:`default_schedule`
            truncated at ``target`` (or ``rounds`` equal pruning factors when ``rounds`` is given:
            ``keep_k = (1 − target)^(k/rounds)``, k = 1..rounds). ``"pq"``: sparsity-adaptive
            (SAP, Diao et al. 2023; :mod:`sparseode.prune.pq`): each round's keep ratio is computed
            from the current weights by :func:`sparseode.prune.pq.pq_next_keep` (``pq_params``:
            ``p, q, gamma, eta_r, beta``); the round that reaches ``target`` (clipped to it) is the
            final one, and at most ``rounds`` rounds run (default 30; the last one goes to
            ``target``).
        method: importance measure (a key of :data:`sparseode.prune.MEASURES`).
        granularity, scope, block, filter_fn: passed to :func:`sparseode.prune.apply`.
        stop: an early-stopping rule for the intermediate rounds, e.g. :class:`ICP`: must provide
            ``reference(model)``, ``start()``, ``finish() -> {"steps", "reason", "checks"}`` and be
            a ``fit`` callback. ``None``: every round runs ``fit`` to its budget.
        loss_fn, data, n_batches: for data-driven measures (see :func:`importance`).
        evaluate: ``evaluate(model) -> float`` validation metric after each round (default: the
            fit result's ``val_metric``/``best_val``).
        final_fit: the fit of the final round (default ``fit``); it always runs to its budget.
        steps_per_epoch: converts steps to epochs in the history (default: taken from ``stop``
            or from the first round run to its budget, ``steps / epochs_run``).
        checkpoint_dir: also save every round's state dict as ``round_XX.pt`` there.
        seed: seed of the ``"random"`` measure (plus the round index).
        progress: a tqdm bar over the rounds.
        pq_params: hyperparameters of ``schedule="pq"``.
        rewind: weight rewinding as in lottery-ticket IMP (Frankle & Carbin 2019; Frankle et al.
            2020), via :func:`sparseode.prune.rewinding`: after each round's pruning step, before
            its retraining (``fit`` and ``final_fit``), the kept weights are reset to earlier
            values, ``θ ← m ⊙ θ_rewind`` (masks kept; every trainable parameter, biases too).
            ``None`` (default): no rewinding, retrain from the current weights. ``"init"``: the
            weights ``model`` holds when :func:`iterative` is called. ``k`` (int ≥ 0): the weights
            after ``k`` optimiser steps of the first round's retraining (counted by a callback
            added to that round's ``fit``; ``k = 0``: right after the first pruning step; if the
            first retraining runs fewer than ``k`` steps, its final weights, with a warning); the
            first round itself is not rewound.

    Returns:
        :class:`PruneHistory` with one :class:`RoundRecord` per round and every round's
        checkpoint (``history.checkpoints``, CPU copies; load with :func:`load_pruned`).
    """
    if method not in MEASURES:
        raise ValueError(f"unknown method={method!r}; choose one of {sorted(MEASURES)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity={granularity!r}; choose one of {sorted(GRANULARITIES)}")
    target = _check_sparsity(target, "target")
    adaptive = isinstance(schedule, str)
    if adaptive:
        if schedule != "pq":
            raise ValueError(f"schedule must be keep ratios or 'pq', got {schedule!r}")
        from sparseode.prune.pq import check_pq_params, pq_next_keep

        pq_kw = {"p": 0.5, "q": 1.0, "gamma": 1.0, "eta_r": 0.0, "beta": 0.9, **dict(pq_params or {})}
        check_pq_params(**pq_kw)
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            raise ValueError(f"rounds must be a positive int, got {rounds!r}")
        max_rounds = rounds if rounds is not None else 30
        keep: list[float] = []
    elif schedule is None:
        if rounds is not None:
            if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
                raise ValueError(f"rounds must be a positive int, got {rounds!r}")
            keep = [(1.0 - target) ** (k / rounds) for k in range(1, rounds + 1)]
        else:
            keep = default_schedule(target)
    else:
        keep = _check_schedule(schedule)
    if stop is not None:
        for attr in ("reference", "start", "finish"):
            if not callable(getattr(stop, attr, None)):
                raise TypeError(f"stop must provide {attr}() (like so.prune.ICP), got {type(stop).__name__}")
    final_fit = final_fit or fit
    if rewind is not None and not (
        rewind == "init" if isinstance(rewind, str)
        else isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0
    ):
        raise ValueError(f"rewind must be None, 'init' or an int >= 0, got {rewind!r}")
    rewind_point: _RewindPoint | None = None
    if rewind == "init":
        init_w = snapshot_weights(model)
        fit, final_fit = rewinding(fit, model, init_w), rewinding(final_fit, model, init_w)
    elif rewind is not None:
        rewind_point = _RewindPoint(model, int(rewind))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    hist = PruneHistory()
    if evaluate is not None:
        hist.dense_metric = float(evaluate(model))
    spe: float | None = steps_per_epoch

    def _plan() -> Iterable[tuple[int, float, bool]]:
        if not adaptive:
            yield from ((k, kr, k == len(keep) - 1) for k, kr in enumerate(keep))
            return
        for k in range(max_rounds):  # computed lazily, from the weights at the round's start
            kr = pq_next_keep(model, filter_fn, **pq_kw)
            final = kr <= 1.0 - target + 1e-12 or k == max_rounds - 1
            yield k, (1.0 - target if final else kr), final
            if final:
                return

    bar = tqdm(_plan(), total=None if adaptive else len(keep), desc=f"prune {method}",
               disable=not progress, leave=False)
    for k, kr, is_final in bar:
        t0 = time.perf_counter()
        s_k = min(max(1.0 - kr, 0.0), 1.0 - 1e-12)
        use_stop = stop is not None and not is_final
        if use_stop:
            stop.reference(model)
        scores = importance(model, method, loss_fn=loss_fn, data=data, n_batches=n_batches,
                            seed=seed + k if method == "random" else None)
        apply(model, scores, s_k, granularity=granularity, block=block, scope=scope, filter_fn=filter_fn)
        achieved = sparsity(model, filter_fn).total
        checks: list[dict[str, Any]] = []
        extra: list[Any] = []
        if rewind_point is not None and k == 0 and not is_final:
            rewind_point.start()
            extra = [rewind_point]
        if use_stop:
            stop.start()
            result = fit(model, callbacks=[stop, *extra])
            rec = stop.finish()
            reason, checks = rec["reason"], rec.get("checks", [])
            steps = int(getattr(result, "steps", rec["steps"]) or rec["steps"])
        else:
            result = (final_fit if is_final else fit)(model, callbacks=extra)
            reason = "budget"
            steps = int(getattr(result, "steps", 0) or 0)
        if extra:  # late rewinding: every later round's retraining starts from θ after k steps
            w_k = rewind_point.finish()
            fit, final_fit = rewinding(fit, model, w_k), rewinding(final_fit, model, w_k)
        if spe is None and stop is not None and getattr(stop, "steps_per_epoch", None):
            spe = stop.steps_per_epoch
        if spe is None and reason == "budget" and getattr(result, "epochs_run", None):
            spe = steps / float(result.epochs_run)
        val = float(evaluate(model)) if evaluate is not None else _val_from_result(result)
        sd = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
        hist.checkpoints.append(sd)
        if ckpt_dir is not None:
            torch.save(sd, ckpt_dir / f"round_{k:02d}.pt")
        hist.rounds.append(RoundRecord(
            round=k, target_sparsity=1.0 - kr, sparsity=achieved, val_metric=val, steps=steps,
            epochs=_epochs_of(result, steps, spe), time_s=time.perf_counter() - t0,
            stop_reason=reason, final=is_final, checks=checks))
        bar.set_postfix(sparsity=f"{achieved:.3f}", val=f"{val:.4f}", stop=reason)
    # rounds recorded before steps-per-epoch was known
    if spe:
        for r in hist.rounds:
            if math.isnan(r.epochs):
                r.epochs = r.steps / spe
    return hist


class _RewindPoint:
    """``fit`` callback of :func:`iterative`'s first round: snapshots the weights after ``k`` steps."""

    def __init__(self, model: nn.Module, k: int):
        self.model, self.k = model, k
        self.steps, self.weights = 0, None

    def start(self) -> None:
        self.steps = 0
        self.weights = snapshot_weights(self.model) if self.k == 0 else None

    def __call__(self, state: Any) -> bool:  # noqa: ARG002
        self.steps += 1
        if self.steps == self.k:
            self.weights = snapshot_weights(self.model)
        return False

    def finish(self) -> dict[str, torch.Tensor]:
        if self.weights is None:
            warnings.warn(f"rewind={self.k}: the first retraining ran only {self.steps} optimiser "
                          "steps; rewinding to its final weights", stacklevel=3)
            self.weights = snapshot_weights(self.model)
        return self.weights


def one_shot(
    model: nn.Module,
    fit: FitFn | None,
    sparsity: float,
    method: str = "magnitude",
    granularity: str = "weight",
    **kwargs: Any,
) -> PruneHistory:
    """Prune once to ``sparsity`` and (if ``fit`` is given) retrain once to the fit's budget.

    ``kwargs`` as for :func:`iterative`.
    """
    s = _check_sparsity(sparsity)
    if fit is None:
        def fit(model: nn.Module, callbacks: Sequence[Any] = ()) -> None:  # noqa: ARG001
            return None
    return iterative(model, fit, target=s, schedule=[1.0 - s], method=method,
                     granularity=granularity, **kwargs)
