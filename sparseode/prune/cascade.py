"""The pieces of one :func:`sparseode.prune.iterative` run: its plan of keep ratios, the rewinding
point, the per-round scoring (sharded over ranks under ``torchrun``) and the resumable state on
disk (``cascade.json`` and ``round_XX.pt`` in ``checkpoint_dir``)."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from sparseode import distributed
from sparseode.prune.history import PruneHistory
from sparseode.prune.importance import MEASURES, LossFn, importance
from sparseode.args import check_sparsity
from sparseode.prune.checkpoint import load_pruned
from sparseode.prune.layers import FilterFn
from sparseode.prune.presets import PRESETS, preset, truncate
from sparseode.prune.report import sparsity
from sparseode.prune.rewind import snapshot_weights

STATE_FILE = "cascade.json"
REWIND_FILE = "rewind.pt"
AT_TARGET = 0.005  # a model this close below a sparsity is at it (per-layer rounding of apply)


def default_schedule(target: float = 0.98) -> list[float]:
    """Keep ratios of the flow-pruning cascade, truncated at ``1 − target`` (inclusive): the
    ``"sparse_flows"`` preset (:mod:`sparseode.prune.presets`).

    Geometric 0.8 → 0.2 in 20 steps, then linear 0.18 → 0.02 in 9 steps (29 steps, 98%).
    If ``1 − target`` is not on the grid it is appended as the last keep ratio.
    """
    return truncate(PRESETS["sparse_flows"], check_sparsity(target, "target"))


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


def _check_rounds(rounds: int | None) -> None:
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")


class Plan:
    """The rounds of a cascade: ``(index, keep ratio, final)``; fixed, or adaptive (``"pq"``)."""

    def __init__(self, target: float, schedule: Sequence[float] | str | None, rounds: int | None,
                 pq_params: Mapping[str, float] | None, filter_fn: FilterFn | None) -> None:
        self.target, self.filter_fn = target, filter_fn
        self.adaptive = isinstance(schedule, str) and schedule == "pq"
        _check_rounds(rounds)
        if isinstance(schedule, str) and not self.adaptive:
            if rounds is not None:
                raise ValueError(f"rounds={rounds!r} cannot be combined with schedule={schedule!r}: "
                                 "the preset fixes its rounds")
            self.keep = preset(schedule, target)
        elif self.adaptive:
            from sparseode.prune.pq import check_pq_params

            self.pq_kw = {"p": 0.5, "q": 1.0, "gamma": 1.0, "eta_r": 0.0, "beta": 0.9, **dict(pq_params or {})}
            check_pq_params(**self.pq_kw)
            self.max_rounds, self.keep = (rounds if rounds is not None else 30), []
        elif schedule is None:
            self.keep = ([(1.0 - target) ** (k / rounds) for k in range(1, rounds + 1)] if rounds is not None
                         else default_schedule(target))
        else:
            self.keep = _check_schedule(schedule)

    def skip_pruned(self, current: float) -> None:
        """Drop the rounds that would prune nothing (sparsity at most ``current + 0.005``), saying
        so; the last round stays (the final retraining)."""
        if current <= 1e-12:
            return
        at_target = current >= self.target - AT_TARGET
        if at_target and distributed.is_main():
            warnings.warn(f"iterative: the model is already at sparsity {current:.4f}, at or past target="
                          f"{self.target}: no round prunes anything; only the final retraining runs", stacklevel=3)
        if self.adaptive:
            return
        kept = [kr for kr in self.keep[:-1] if 1.0 - kr > current + AT_TARGET] + self.keep[-1:]
        if len(kept) < len(self.keep) and not at_target and distributed.is_main():
            warnings.warn(f"iterative: the model is already at sparsity {current:.4f}: "
                          f"{len(self.keep) - len(kept)} of {len(self.keep)} scheduled rounds would prune "
                          "nothing and are skipped", stacklevel=3)
        self.keep = kept

    def __len__(self) -> int:
        return 0 if self.adaptive else len(self.keep)

    def rounds(self, model: nn.Module, start: int = 0) -> Iterator[tuple[int, float, bool]]:
        if not self.adaptive:
            yield from ((k, kr, k == len(self.keep) - 1) for k, kr in enumerate(self.keep) if k >= start)
            return
        from sparseode.prune.pq import pq_next_keep

        for k in range(start, self.max_rounds):  # computed lazily, from the weights at the round's start
            kr = pq_next_keep(model, self.filter_fn, **self.pq_kw)
            final = kr <= 1.0 - self.target + 1e-12 or k == self.max_rounds - 1
            yield k, (1.0 - self.target if final else kr), final
            if final:
                return


def scores(model: nn.Module, method: str, loss_fn: LossFn | None, data: Iterable[Any] | None,
           n_batches: int, seed: int | None) -> dict[str, torch.Tensor]:
    """``importance`` of the round; under ``torchrun`` a data-driven measure runs on this rank's
    share of the first ``n_batches`` batches (``data`` must yield the same batches on every rank)
    and the gradients are averaged over all of them, as in one process."""
    if not distributed.is_distributed() or not MEASURES[method].needs_data or data is None:
        return importance(model, method, loss_fn=loss_fn, data=data, n_batches=n_batches, seed=seed)
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
    batches = list(itertools.islice(iter([data] if torch.is_tensor(data) else data), n_batches))
    start, stop = distributed.shard(len(batches))
    if stop == start:
        raise ValueError(f"n_batches: {len(batches)} scoring batch(es) cannot be shared by "
                         f"{distributed.world_size()} ranks; give at least one batch per rank")
    with distributed.collective():
        return importance(model, method, loss_fn=loss_fn, data=batches[start:stop], n_batches=stop - start,
                          seed=seed)


@contextlib.contextmanager
def sharded_probe(stop: Any) -> Iterator[None]:
    """Under ``torchrun``, give ``stop`` (an :class:`ICP`) this rank's contiguous share of its probe
    batches for the block; its measures combine the shares inside :func:`distributed.collective`."""
    probe = getattr(stop, "probe", None)
    if not distributed.is_distributed() or not isinstance(probe, list):
        yield
        return
    start, end = distributed.shard(len(probe))
    if end == start:
        raise ValueError(f"stop: the probe's {len(probe)} batch(es) cannot be shared by {distributed.world_size()} "
                         "ranks; give at least one probe batch per rank")
    stop.probe = probe[start:end]
    try:
        yield
    finally:
        stop.probe = probe


class RewindPoint:
    """``fit`` callback of :func:`iterative`'s first round: snapshots the weights after ``k`` steps."""

    def __init__(self, model: nn.Module, k: int):
        self.model, self.k = model, k
        self.steps, self.weights = 0, None

    def start(self) -> None:
        self.steps = 0
        self.weights = snapshot_weights(self.model) if self.k == 0 else None

    def __call__(self, state: Any) -> bool:
        self.steps += 1
        if self.steps == self.k:  # the state's model: the masked model, also in a sparse round
            self.weights = snapshot_weights(getattr(state, "model", self.model))
        return False

    def finish(self) -> dict[str, torch.Tensor]:
        if self.weights is None:
            warnings.warn(f"rewind={self.k}: the first retraining ran only {self.steps} optimiser "
                          "steps; rewinding to its final weights", stacklevel=3)
            self.weights = snapshot_weights(self.model)
        return self.weights


class LRProbe:
    """``fit`` callback of every round: the learning rate (first parameter group) of the round's
    first and last optimiser step; NaN for a fit that calls no callback."""

    def __init__(self) -> None:
        self.first = self.last = math.nan

    def start(self) -> None:
        self.first = self.last = math.nan

    def __call__(self, state: Any) -> bool:
        groups = getattr(getattr(state, "optimizer", None), "param_groups", None)
        if groups:
            self.last = float(groups[0]["lr"])
            self.first = self.last if math.isnan(self.first) else self.first
        return False


def check_warm_restarts(warm_restarts: Any, fits: Sequence[Any]) -> bool:
    """``warm_restarts`` checked (a bool); without warm restarts every fit must take the ``lr``
    and ``milestones`` keywords (as :func:`sparseode.train.fit` does), which it is then given."""
    if not isinstance(warm_restarts, bool):
        raise TypeError(f"warm_restarts must be True or False, got {warm_restarts!r}")
    if not warm_restarts:
        import inspect

        for fit in fits:
            try:
                params = inspect.signature(fit).parameters
            except (TypeError, ValueError):
                continue  # not introspectable: let the call tell
            takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            if not takes_all and not {"lr", "milestones"} <= set(params):
                raise TypeError("warm_restarts=False passes lr= and milestones= to the fit of every round after "
                                f"the first, but {getattr(fit, '__name__', fit)!r} takes neither: use a "
                                "functools.partial of sparseode.train.fit, or warm_restarts=True")
    return warm_restarts


# -- the state on disk -------------------------------------------------------------------------
def _atomic_save(obj: Any, path: Path, as_json: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if as_json:
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def save_round(ckpt_dir: Path, k: int, state_dict: dict[str, torch.Tensor], hist: PruneHistory,
               meta: dict[str, Any]) -> None:
    """Write ``round_XX.pt`` (the state dict, masks included) and then ``cascade.json`` (the
    history so far): a run killed at any point resumes from its last complete round. Rank 0 only."""
    if not distributed.is_main():
        return
    _atomic_save(state_dict, ckpt_dir / f"round_{k:02d}.pt")
    dense = None if math.isnan(hist.dense_metric) else hist.dense_metric
    _atomic_save({**meta, "rounds": hist.to_dicts(), "dense_metric": dense}, ckpt_dir / STATE_FILE, as_json=True)


def save_rewind(ckpt_dir: Path | None, weights: dict[str, torch.Tensor]) -> None:
    if ckpt_dir is not None and distributed.is_main():
        _atomic_save(weights, ckpt_dir / REWIND_FILE)


def resume(model: nn.Module, ckpt_dir: Path, meta: dict[str, Any]) -> tuple[PruneHistory, dict | None] | None:
    """Load the last complete round from ``ckpt_dir`` into ``model``: ``(history, rewind weights)``,
    or None when nothing was saved there yet. ``meta`` must match the saved run's."""
    path = ckpt_dir / STATE_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    for key, value in meta.items():
        if saved.get(key) != value:
            raise ValueError(f"resume: {path} holds a run with {key}={saved.get(key)!r}, this call has {value!r}")
    hist = PruneHistory.from_dicts(saved["rounds"], saved.get("dense_metric"))
    if hist.rounds:
        last = hist.rounds[-1].round
        load_pruned(model, torch.load(ckpt_dir / f"round_{last:02d}.pt", map_location="cpu", weights_only=True))
    rw = ckpt_dir / REWIND_FILE
    return hist, (torch.load(rw, map_location="cpu", weights_only=True) if rw.exists() else None)


def check_floors(model: nn.Module, target: float, prune_kw: Mapping[str, Any]) -> None:
    """Fail before any round when ``min_density``/``keep_dense`` are invalid or keep ``target`` out
    of reach (``apply``'s errors, which name them): apply them once, to a copy, at ``target``."""
    if "min_density" not in prune_kw and "keep_dense" not in prune_kw:
        return
    from sparseode.prune.checkpoint import clone
    from sparseode.prune.masking import apply

    apply(clone(model), "magnitude", target, **prune_kw)


def current_sparsity(model: nn.Module, filter_fn: FilterFn | None) -> float:
    try:
        return sparsity(model, filter_fn).total
    except (ValueError, ZeroDivisionError):
        return 0.0


FitFn = Callable[..., Any]
