"""Prune-retrain schedules: the iterative cascade used to prune flows, and one-shot pruning.

One round of :func:`iterative` (Liebenwein et al. 2021, "Sparse flows"; Frankle & Carbin 2019):

1. (with ``stop``) record the reference flows of the current network (``stop.reference``),
2. score the current network (``importance(method)``) and prune to the round's sparsity
   ``s_k = 1 − keep_k`` (masks compose: nothing pruned earlier comes back),
3. retrain from the current weights with ``fit(model, callbacks=[...])``; every call builds a new
   optimiser, so the learning-rate schedule restarts (``warm_restarts``, as in the paper); with
   ``sparse`` the round trains a sparsified copy holding the round's pattern and the values come
   back into the masked model (:mod:`sparseode.prune.sparse_retrain`); an intermediate round ends
   early when ``stop`` says so, the final round always runs ``final_fit`` (default ``fit``) to its
   budget,
4. evaluate, record (sparsity, validation metric, steps/epochs, wall time, stop reason) and keep a
   checkpoint (``state_dict`` with the masks).

The default schedule of keep ratios (:func:`default_schedule`): geometric from 0.8 to 0.2 in 20
steps, ``keep_k = 0.8·(0.2/0.8)^(k/19)``, then linear from 0.18 to 0.02 in 9 steps (down to 98%
sparsity); truncated at ``target`` (and ending exactly at it): the ``"sparse_flows"`` preset of
:mod:`sparseode.prune.presets`, beside the paper's tabular cascades. The plan, scoring, rewinding and
resumable state live in :mod:`sparseode.prune.cascade`.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sparseode import distributed
from sparseode.prune import cascade
from sparseode.prune.cascade import FitFn, Plan, RewindPoint, default_schedule
from sparseode.prune.history import PruneHistory, RoundRecord
from sparseode.prune.importance import MEASURES, LossFn
from sparseode.args import check_sparsity as _check_sparsity
from sparseode.prune.granularity import GRANULARITIES
from sparseode.prune.layers import FilterFn
from sparseode.prune.masking import apply
from sparseode.prune.presets import preset
from sparseode.prune.report import sparsity
from sparseode.prune.rewind import rewinding, snapshot_weights
from sparseode.prune.sparse_retrain import SparseRetrain, auto_sparse, check_sparse

__all__ = ["iterative", "one_shot", "default_schedule", "PruneHistory", "RoundRecord"]


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


def _check_args(method: str, granularity: str, stop: Any, rewind: Any) -> None:
    if method not in MEASURES:
        raise ValueError(f"unknown method={method!r}; choose one of {sorted(MEASURES)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity={granularity!r}; choose one of {sorted(GRANULARITIES)}")
    if stop is not None:
        for attr in ("reference", "start", "finish"):
            if not callable(getattr(stop, attr, None)):
                raise TypeError(f"stop must provide {attr}() (like so.prune.ICP), got {type(stop).__name__}")
    if rewind is not None and not (
        rewind == "init" if isinstance(rewind, str)
        else isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0
    ):
        raise ValueError(f"rewind must be None, 'init' or an int >= 0, got {rewind!r}")


def _sparse_mode(sparse: bool | str, model: nn.Module, fits: Sequence[Any]) -> bool | str:
    """False (masked rounds), True or "auto" (sparse rounds as :class:`SparseRetrain` decides);
    "auto" is False where the fused field op does not run the model, or where a fit is a wrapper
    (``functools.wraps``, e.g. :func:`rewinding`) that may read the model's weights by name."""
    if sparse != "auto":
        return sparse
    wrapped = any(getattr(f, "__wrapped__", None) is not None for f in fits)
    return "auto" if auto_sparse(model)[0] and not wrapped else False


def _pass_through(**kwargs: Any) -> dict[str, Any]:
    """The options of ``apply`` that were given (its defaults otherwise)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _resolve_target(target: float | None, schedule: Any) -> float:
    if target is not None:
        return _check_sparsity(target, "target")
    if isinstance(schedule, str) and schedule != "pq":
        return round(1.0 - preset(schedule)[-1], 12)
    return 0.98


class _Cascade:
    """The state carried from round to round: the fits (rewinding wrapped in), steps per epoch,
    the history, and where rounds are saved."""

    def __init__(self, model, fit, final_fit, stop, rewind, ckpt_dir, prune_kw, score_kw, evaluate,
                 spe, sparse, warm_restarts) -> None:
        if sparse:  # retrain on the sparsified model; rewinding (set_rewind) wraps outside, on the masked one
            fit, final_fit = SparseRetrain(fit, sparse), SparseRetrain(final_fit, sparse)
        self.sparse_fits = (fit, final_fit) if sparse else None
        self.model, self.fit, self.final_fit, self.stop = model, fit, final_fit, stop
        self.rewind, self.ckpt_dir, self.prune_kw, self.score_kw = rewind, ckpt_dir, prune_kw, score_kw
        self.evaluate, self.spe, self.warm = evaluate, spe, warm_restarts
        self.lr, self.warned = cascade.LRProbe(), False
        self.rewind_point: RewindPoint | None = None
        self.hist = PruneHistory()

    def set_rewind(self, weights: dict[str, torch.Tensor]) -> None:
        self.fit = rewinding(self.fit, self.model, weights)
        self.final_fit = rewinding(self.final_fit, self.model, weights)
        cascade.save_rewind(self.ckpt_dir, weights)

    def start(self, resume: bool, meta: dict[str, Any]) -> int:
        """The first round to run (after loading a saved run when resuming)."""
        saved = cascade.resume(self.model, self.ckpt_dir, meta) if resume else None
        if saved is not None:
            self.hist, weights = saved
            if weights is not None:
                self.set_rewind(weights)
            if self.hist.rounds and self.spe is None and self.hist.rounds[0].epochs:
                r0 = self.hist.rounds[0]
                self.spe = r0.steps / r0.epochs if r0.stop_reason == "budget" and r0.epochs > 0 else None
        if saved is None or not self.hist.rounds:
            if self.evaluate is not None:
                self.hist.dense_metric = float(self.evaluate(self.model))
            if self.rewind == "init":
                self.set_rewind(snapshot_weights(self.model))
        if self.rewind is not None and self.rewind != "init" and not (saved and self.hist.rounds):
            self.rewind_point = RewindPoint(self.model, int(self.rewind))
        return self.hist.rounds[-1].round + 1 if self.hist.rounds else 0

    def _fit_kwargs(self) -> dict[str, Any]:
        """Without warm restarts, a round after the first trains at the learning rate the previous
        round ended with, held constant."""
        last = self.hist.rounds[-1].lr_end if self.hist.rounds else math.nan
        return {} if self.warm or math.isnan(last) else {"lr": last, "milestones": ()}

    def _retrain(self, k: int, is_final: bool) -> tuple[Any, str, int, list]:
        extra: list[Any] = []
        if self.rewind_point is not None and k == 0 and not is_final:
            self.rewind_point.start()
            extra = [self.rewind_point]
        self.lr.start()
        kwargs = self._fit_kwargs()
        if self.stop is not None and not is_final:
            self.stop.start()
            result = self.fit(self.model, callbacks=[self.stop, *extra, self.lr], **kwargs)
            rec = self.stop.finish()
            reason, checks = rec["reason"], rec.get("checks", [])
            steps = int(getattr(result, "steps", rec["steps"]) or rec["steps"])
        else:
            result = (self.final_fit if is_final else self.fit)(self.model, callbacks=[*extra, self.lr], **kwargs)
            reason, checks, steps = "budget", [], int(getattr(result, "steps", 0) or 0)
        if extra:  # late rewinding: every later round's retraining starts from θ after k steps
            self.set_rewind(self.rewind_point.finish())
            self.rewind_point = None
        return result, reason, steps, checks

    def round(self, k: int, kr: float, is_final: bool, method: str, seed: int) -> RoundRecord:
        t0 = time.perf_counter()
        s_k = min(max(1.0 - kr, 0.0), 1.0 - 1e-12)
        if self.stop is not None and not is_final:
            self.stop.reference(self.model)
        sc = cascade.scores(self.model, method, seed=seed + k if method == "random" else None, **self.score_kw)
        apply(self.model, sc, s_k, **self.prune_kw)
        distributed.broadcast_masks(self.model)  # rank 0 decides
        distributed.check_same_masks(self.model, f"after pruning round {k}")
        achieved = sparsity(self.model, self.prune_kw["filter_fn"]).total
        result, reason, steps, checks = self._retrain(k, is_final)
        if self.spe is None and self.stop is not None and getattr(self.stop, "steps_per_epoch", None):
            self.spe = self.stop.steps_per_epoch
        if self.spe is None and reason == "budget" and getattr(result, "epochs_run", None):
            self.spe = steps / float(result.epochs_run)
        val = float(self.evaluate(self.model)) if self.evaluate is not None else _val_from_result(result)
        distributed.check_same_masks(self.model, f"after retraining round {k}")
        sparse = self.sparse_fits is not None and self.sparse_fits[int(is_final)].last_sparse
        self._check_restart(k)
        return RoundRecord(round=k, target_sparsity=1.0 - kr, sparsity=achieved, val_metric=val, steps=steps,
                           epochs=_epochs_of(result, steps, self.spe), time_s=time.perf_counter() - t0,
                           stop_reason=reason, final=is_final, sparse=sparse, lr_start=self.lr.first,
                           lr_end=self.lr.last, checks=checks)

    def _check_restart(self, k: int) -> None:
        """With warm restarts, say so once when a round did not start at the first round's LR."""
        first = next((r.lr_start for r in self.hist.rounds if not math.isnan(r.lr_start)), math.nan)
        if (self.warm and not self.warned and not math.isnan(first) and not math.isnan(self.lr.first)
                and not math.isclose(self.lr.first, first, rel_tol=1e-9) and distributed.is_main()):
            warnings.warn(f"iterative(warm_restarts=True): round {k} started at lr {self.lr.first:g}, the first round "
                          f"at {first:g}: the fit does not restart its learning-rate schedule (it must build its "
                          "optimiser and scheduler per call, as sparseode.train.fit does)", stacklevel=4)
            self.warned = True


def iterative(
    model: nn.Module,
    fit: FitFn,
    target: float | None = None,
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
    resume: bool = False,
    sparse: bool | str = "auto",
    warm_restarts: bool = True,
    min_density: float | Mapping[str, float] | None = None,
    keep_dense: Sequence[str] | Callable[[str, nn.Module], bool] | None = None,
) -> PruneHistory:
    """Prune-retrain cascade: prune, retrain from the current weights, repeat; in place.

    Args:
        model: the (trained, dense or already pruned) model.
        fit: ``fit(model, callbacks=[...]) -> FitResult``-like; retrains ``model`` in place with a
            fresh optimiser and learning-rate schedule (e.g. a ``functools.partial`` of
            :func:`sparseode.train.fit` with its data and budget). The result's ``steps`` (and
            ``epochs_run``, ``val_metric``/``best_val``) are read when present.
        target: final sparsity in [0, 1) (default 0.98; with a preset ``schedule``, the preset's
            last sparsity).
        schedule: keep ratios, non-increasing in (0, 1]; default :func:`default_schedule`
            truncated at ``target`` (or ``rounds`` equal pruning factors when ``rounds`` is given:
            ``keep_k = (1 − target)^(k/rounds)``, k = 1..rounds). A preset name of
            :data:`sparseode.prune.presets.PRESETS`: the Sparse Flows paper's cascades,
            ``"sparse_flows"`` (29 rounds to 98%), ``"sparse_flows_8"`` (8 rounds to 90%) and
            ``"sparse_flows_12"`` (12 rounds to 95%), truncated at ``target`` when it is given
            (not with ``rounds``). ``"pq"``: sparsity-adaptive
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
        checkpoint_dir: also save every round's state dict as ``round_XX.pt`` there, with the
            history so far in ``cascade.json`` (and ``rewind.pt``) for ``resume``.
        resume: with ``checkpoint_dir``, continue a run that was stopped (killed): load the last
            complete round saved there into ``model`` and run the remaining rounds; a folder with
            no saved run starts from the beginning, so one command serves both. The checks of the
            finished rounds are not kept, and a ``stop`` rule's reference is recorded afresh from
            the resumed model (``ICP(reference="dense")`` loses its dense reference).
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
        sparse: retrain each round on the sparsified model (:mod:`sparseode.prune.sparse_retrain`):
            ``fit`` gets a ``sparsify``'d copy holding the round's pattern, and the trained values
            come back into the masked ``model``, which everything else (scoring, pruning, ``stop``,
            rewinding, ``evaluate``, checkpoints) reads; masks never change. ``True``: every pruned
            layer is CSR; ``"auto"`` (default): only where the fused field op runs the model (an
            ``MLPVectorField`` on the CPU, the C++ extension loaded) and only layers at density <=
            0.9 (a round with none trains masked); ``False``: masked dense rounds. ``fit`` must
            build its optimiser from the model it is given (no optimiser state crosses rounds);
            a ``fit`` wrapper that reads weights by name sees the sparse model, so ``"auto"``
            trains masked when a fit is a ``functools.wraps`` wrapper such as :func:`rewinding`
            (``rewind=`` works in every mode). The history says per round (``RoundRecord.sparse``).
        warm_restarts: ``True`` (default, as in the Sparse Flows paper): every round's ``fit``
            starts its learning-rate schedule afresh, at the initial LR (``fit`` builds its
            optimiser and schedule per call; a warning says when a round's first LR differs from
            the first round's). ``False`` (fine-tuning): every round after the first gets ``lr=``
            the LR of the previous round's last step and ``milestones=()`` (constant), so ``fit``
            must take those keywords, as :func:`sparseode.train.fit` does. Each round records
            ``lr_start``/``lr_end``.
        min_density, keep_dense: passed to every pruning step (:func:`sparseode.prune.apply`):
            the least share of its weights every layer (or each named layer) keeps, and layers
            never pruned; checked at the start against ``target``.

    Under ``torchrun`` (a process group, :mod:`sparseode.distributed`) every rank runs this with
    the same arguments: ``fit`` trains data-parallel, a data-driven measure scores on each rank's
    share of the ``n_batches`` batches and an ICP ``stop`` measures on each rank's share of its
    probe batches (both combined over the ranks, as one process over all of them: exactly so for
    deterministic models; Hutchinson noise differs per batch position), the masks decided on rank
    0 are broadcast and checked equal on every rank after every round, and only rank 0 shows the
    bar and writes ``checkpoint_dir``.

    A model already at or past ``target`` is said so (a warning) and gets only the final
    retraining; rounds of the schedule that would prune nothing are skipped with a warning.

    Returns:
        :class:`PruneHistory` with one :class:`RoundRecord` per round and every round's
        checkpoint (``history.checkpoints``, CPU copies; load with :func:`load_pruned`).
    """
    _check_args(method, granularity, stop, rewind)
    sparse = _sparse_mode(check_sparse(sparse), model, [fit, final_fit])
    target = _resolve_target(target, schedule)
    plan = Plan(target, schedule, rounds, pq_params, filter_fn)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ckpt_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where the rounds were saved)")
    if ckpt_dir is not None and distributed.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    distributed.check_same_model(model, "at the start of iterative")
    plan.skip_pruned(cascade.current_sparsity(model, filter_fn))
    meta = {"target": target, "method": method, "granularity": granularity,
            "keep": "pq" if plan.adaptive else plan.keep}
    prune_kw = {"granularity": granularity, "block": block, "scope": scope, "filter_fn": filter_fn,
                **_pass_through(min_density=min_density, keep_dense=keep_dense)}
    cascade.check_floors(model, target, prune_kw)
    run = _Cascade(model, fit, final_fit or fit, stop, rewind, ckpt_dir, prune_kw,
                   {"loss_fn": loss_fn, "data": data, "n_batches": n_batches}, evaluate, steps_per_epoch, sparse,
                   cascade.check_warm_restarts(warm_restarts, [fit, final_fit or fit]))
    first = run.start(resume, meta)
    bar = tqdm(plan.rounds(model, first), total=len(plan) - first if len(plan) else None,
               desc=f"prune {method}", disable=not progress or not distributed.is_main(), leave=False)
    with cascade.sharded_probe(stop), distributed.collective():  # measures span the ranks' shards
        for k, kr, is_final in bar:
            rec = run.round(k, kr, is_final, method, seed)
            sd = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
            run.hist.checkpoints.append(sd)
            run.hist.rounds.append(rec)
            if ckpt_dir is not None:
                cascade.save_round(ckpt_dir, k, sd, run.hist, meta)
            bar.set_postfix(sparsity=f"{rec.sparsity:.3f}", stop=rec.stop_reason,
                            val="-" if math.isnan(rec.val_metric) else f"{rec.val_metric:.4f}")
    if run.spe:  # rounds recorded before steps-per-epoch was known
        for r in run.hist.rounds:
            if math.isnan(r.epochs):
                r.epochs = r.steps / run.spe
    return run.hist


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
