"""Training loop for flows and classifiers, in one process or data-parallel under ``torchrun``.

``fit`` runs AdamW with optional LR milestones, shows a tqdm bar (epoch, loss, NFE), validates
each epoch, keeps (and optionally checkpoints) the best model, is deterministic for a seed, and
calls ``callbacks`` after every optimiser step (pruning uses them to keep masks applied and to
stop early). ``evaluate`` (:mod:`sparseode.evaluation`) reports NLL in nats and bits/dim for
flows, accuracy for classifiers. Data forms: see :mod:`sparseode.batching`.

Under a process group (``torchrun``, :func:`sparseode.distributed.init`) ``fit`` wraps the model
in ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA): ``batch_size`` is the global batch,
each rank computes the loss of its share and DDP averages the gradients, so N ranks take the
optimiser steps of one process with the same ``batch_size`` (up to float reduction order).
The bar and the checkpoint are rank 0's; every rank returns the same :class:`FitResult`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparseode import distributed
from sparseode.batching import Batch, Batches, Data, to_device
from sparseode.evaluation import LossFn, bits_per_dim, default_loss, evaluate, model_device, nfe_of, val_metric

__all__ = ["fit", "evaluate", "default_loss", "FitState", "FitResult", "bits_per_dim"]


@dataclass
class FitState:
    """What a callback sees after every optimiser step.

    ``epoch`` is 0-based; ``step`` counts optimiser steps from 1; ``loss`` is this step's loss
    (over the global batch under DDP); ``val_metric`` the latest validation metric (lower is
    better) or None; ``history`` the per-epoch records so far.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    step: int
    loss: float
    val_metric: float | None
    history: list[dict]


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    ``history``: per-epoch dicts (``epoch``, ``loss``, ``val``, ``nfe``, ``time``, ``lr``, ``steps``
    and ``val_*`` entries of :func:`evaluate`); ``epochs_run`` (a partial last epoch counts);
    ``steps``; ``stopped_early`` (a callback returned True); ``best_val`` (None without
    ``val_data``); ``best_epoch``; ``best_state`` (state_dict of the best epoch, by validation
    metric, or by training loss without ``val_data``; tracking restarts if a callback changes the
    model's structure, e.g. by pruning); ``checkpoint`` (path written, or None);
    ``time`` (seconds).
    """

    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    steps: int = 0
    stopped_early: bool = False
    best_val: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = None
    checkpoint: str | None = None
    time: float = 0.0


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: what DDP wraps, so that a loss computed through
    ``model.log_prob`` (not ``forward``) still goes through DDP's gradient synchronisation."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch: Tensor) -> Tensor:
        return self.loss_fn(self.model, batch)


def _check_args(model, epochs, batch_size, max_steps, lr, weight_decay, callbacks) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if any(not callable(cb) for cb in callbacks):
        raise TypeError("callbacks must be callables cb(state) -> bool | None")


def _start_ranks(model: nn.Module, batches: Batches, config: dict[str, Any]) -> None:
    """Fail on every rank, before any training, when the ranks disagree (model, data, arguments)
    or the world size does not divide the global batch."""
    if not distributed.is_distributed():
        return
    distributed.check_same_model(model, "at the start of fit")
    distributed.check_same("the fit arguments and data (tensor data must be the whole data set on every rank: "
                           "fit shards each batch; per-rank data goes in a DataLoader with a DistributedSampler)",
                           {**config, "data": batches.describe()})
    if not batches.presharded:
        distributed.check_divides(config["batch_size"])


def _rank_seed(seed: int) -> int:
    """``seed`` on rank 0; a seed of its own on every other rank (independent Hutchinson noise)."""
    r = distributed.rank()
    return seed if r == 0 else (seed * 1_000_003 + r) % (2 ** 63)


def _no_step_buffer_sync() -> dict[str, bool]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.13 names it forward_sync_buffers (broadcast_buffers is deprecated)
    new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}


class _Trainer:
    """One ``fit`` call's optimiser, loss and bookkeeping (the loop lives in :func:`fit`)."""

    def __init__(self, model, loss_fn, optimizer, callbacks, max_steps, result, bar) -> None:
        self.model, self.optimizer, self.callbacks = model, optimizer, callbacks
        self.max_steps, self.result, self.bar = max_steps, result, bar
        self.device = model_device(model)
        self.ddp = distributed.is_distributed()
        module = _LossModule(model, loss_fn)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
            # masks are buffers set by pruning on rank 0 and broadcast then (and by DDP at its start),
            # not at every step; every trainable parameter (weight_orig of a masked layer,
            # SparseLinear values) is in the loss, so no search for unused ones
            module = DDP(module, device_ids=ids, **_no_step_buffer_sync())
        self.loss_module = module
        self.world = distributed.world_size()

    def step(self, batch: Batch, n_global: int, epoch: int, val: float | None) -> tuple[float, bool]:
        """One optimiser step on this rank's share of a global batch: ``(global mean loss, stop)``."""
        batch = to_device(batch, self.device)
        loss = self.loss_module(*batch)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        n = batch[0].shape[0]
        value = float(loss.detach())
        if self.ddp:  # the global mean and finiteness, known to every rank before any backward
            (s,), _ = distributed.sum_over_ranks([torch.tensor(
                [value * n, 0.0 if math.isfinite(value) else 1.0], dtype=torch.float64, device=self.device)])
            value = float(s[0]) / n_global if not s[1] else math.nan
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at epoch {epoch}, step {self.result.steps + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages over ranks; weighting by the share keeps a ragged last batch exact
        (loss * (n * self.world / n_global) if self.ddp else loss).backward()
        self.optimizer.step()
        self.result.steps += 1
        nfe = nfe_of(self.model)
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch, loss=f"{value:.4f}", nfe=nfe if nfe is not None else "-", refresh=False)
        state = FitState(self.model, self.optimizer, epoch, self.result.steps, value, val, self.result.history)
        stop = any([bool(cb(state)) for cb in self.callbacks])
        stop = distributed.any_rank(stop, self.device) if self.ddp else stop
        if stop:
            self.result.stopped_early = True
        return value, stop or (self.max_steps is not None and self.result.steps >= self.max_steps)


def _epoch(trainer: _Trainer, batches: Batches, shuffle: torch.Generator, epoch: int,
           val: float | None) -> tuple[dict[str, Any], int, bool]:
    """One pass: ``(record without validation, rows seen, stop)``."""
    t0 = time.perf_counter()
    trainer.model.train()
    batches.set_epoch(epoch)
    loss_sum, n_seen, nfe_sum, nfe_n, stop = 0.0, 0, 0, 0, False
    for batch, n_global in batches.iterate_shards(shuffle, min_rows=trainer.world):
        value, stop = trainer.step(batch, n_global, epoch, val)
        loss_sum += value * n_global
        n_seen += n_global
        if (nfe := nfe_of(trainer.model)) is not None:
            nfe_sum += nfe
            nfe_n += 1
        if stop:
            break
    record = {"epoch": epoch, "loss": loss_sum / max(n_seen, 1), "val": None,
              "nfe": nfe_sum / nfe_n if nfe_n else None, "time": time.perf_counter() - t0,
              "lr": trainer.optimizer.param_groups[0]["lr"], "steps": trainer.result.steps}
    return record, n_seen, stop


class _Best:
    """Tracks the best epoch (validation metric, else training loss) and writes the checkpoint."""

    def __init__(self, result: FitResult, checkpoint: str | Path | None, has_val: bool) -> None:
        self.result, self.checkpoint, self.has_val = result, checkpoint, has_val
        self.best_train = math.inf

    def update(self, model: nn.Module, record: dict[str, Any], complete: bool, n_seen: int) -> None:
        res = self.result
        scored = complete if self.has_val else n_seen > 0
        if scored and res.best_state is not None and set(res.best_state) != set(model.state_dict()):
            # the structure changed (e.g. pruned by a callback): earlier states no longer apply
            res.best_val, res.best_epoch, res.best_state, self.best_train = None, None, None, math.inf
        if self.has_val and complete:
            improved = res.best_val is None or record["val"] < res.best_val
            if improved:
                res.best_val = record["val"]
        elif not self.has_val and n_seen:
            improved = record["loss"] < self.best_train
            self.best_train = min(self.best_train, record["loss"])
        else:
            improved = False
        if improved:
            res.best_epoch = record["epoch"]
            res.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if self.checkpoint is not None:
                self._save(record)

    def _save(self, record: dict[str, Any]) -> None:
        path = Path(self.checkpoint)
        if distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": self.result.best_state, "epoch": record["epoch"], "val": record["val"],
                        "loss": record["loss"]}, path)
        self.result.checkpoint = str(path)


def _close_epoch(trainer: _Trainer, best: _Best, record: dict[str, Any], n_seen: int,
                 val_batches: Batches | None, custom_loss: LossFn | None) -> float | None:
    """Validate (unless a callback stopped the epoch), track the best state, log; the epoch's val."""
    result = trainer.result
    result.epochs_run = record["epoch"] + 1
    complete = not result.stopped_early
    if val_batches is not None and complete:
        ev = evaluate(trainer.model, val_batches, loss_fn=custom_loss, sharded=True)
        record["val"] = val_metric(ev, custom_loss is not None)
        record.update({f"val_{k}": v for k, v in ev.items()})
    best.update(trainer.model, record, complete, n_seen)
    result.history.append(record)
    trainer.bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}",
                            val="-" if record["val"] is None else f"{record['val']:.4f}",
                            nfe="-" if record["nfe"] is None else f"{record['nfe']:.0f}")
    return record["val"]


def fit(
    model: nn.Module,
    data: Data,
    *,
    loss_fn: LossFn | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    val_data: Data | None = None,
    callbacks: Sequence[Callable[[FitState], bool | None]] = (),
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    max_steps: int | None = None,
    restore_best: bool = True,
    val_batch_size: int = 1024,
) -> FitResult:
    """Train ``model`` with AdamW (data-parallel under ``torchrun``: see the module doc).

    Args:
        model: e.g. a ``CNF`` or an ``ODEClassifier`` (trained in place).
        data: Tensor (flows), tuple ``(X, y)``, or re-iterable of batches; NaN/inf is rejected.
        loss_fn: ``loss_fn(model, batch: tuple) -> scalar``, a mean over the batch; default
            :func:`default_loss`.
        epochs: passes over the data.
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        batch_size: (global) batch size for tensor data, shuffled each epoch with a generator
            seeded by ``seed``; under DDP the world size must divide it.
        milestones, gamma: multiply the LR by ``gamma`` at these epoch indices (MultiStepLR).
        val_data: evaluated after every epoch; its metric (flows: NLL; classifiers: cross-entropy;
            custom ``loss_fn``: that loss; lower is better) selects the best model.
        callbacks: ``cb(FitState) -> bool | None`` after every optimiser step; True stops at once
            (under DDP: on every rank, when it says so on any; there a callback must not change
            the model's parameters, e.g. prune: prune between ``fit`` calls, as ``iterative`` does).
        seed: seeds the shuffling and, inside a forked RNG, torch's global RNG (Hutchinson
            probes, base draws), so the same seed and initial model give the same run.
        progress: show a tqdm bar with epoch, loss and NFE (rank 0 only).
        checkpoint: path; the best state (``{"state_dict", "epoch", "val"}``) is saved there
            whenever it improves (by rank 0; keys without DDP's ``module.`` prefix).
        max_steps: stop after this many optimiser steps in total.
        restore_best: with ``val_data``, load the best state back into the model at the end;
            not when a callback stopped the run: a stopping rule (ICP) chose that state. Best
            tracking restarts when a callback changes the model's structure (pruning).
        val_batch_size: batch size used for validation.

    Returns: :class:`FitResult`.

    Raises: ValueError/TypeError for bad arguments or data (naming the argument); under DDP,
    ValueError/RuntimeError on every rank at the start when the world size does not divide
    ``batch_size`` or the ranks disagree on the model or the arguments; FloatingPointError if
    the loss becomes NaN or inf.
    """
    from tqdm.auto import tqdm

    _check_args(model, epochs, batch_size, max_steps, lr, weight_decay, callbacks)
    batches = Batches(data, batch_size, "data")
    val_batches = None if val_data is None else Batches(val_data, val_batch_size, "val_data")
    custom_loss = loss_fn is not None
    loss_fn = loss_fn if loss_fn is not None else default_loss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")
    _start_ranks(model, batches, {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                                  "max_steps": max_steps, "val": val_batches is not None})
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    result = FitResult()
    best = _Best(result, checkpoint, val_batches is not None)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(_rank_seed(seed))
        shuffle = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma) if milestones else None
        total = epochs * len(batches) or None
        bar = tqdm(total=min(total, max_steps) if total and max_steps else total, desc="fit", dynamic_ncols=True,
                   leave=False, disable=not progress or not distributed.is_main())
        trainer = _Trainer(model, loss_fn, optimizer, callbacks, max_steps, result, bar)
        val: float | None = None
        try:
            for epoch in range(epochs):
                record, n_seen, stop = _epoch(trainer, batches, shuffle, epoch, val)
                v = _close_epoch(trainer, best, record, n_seen, val_batches, loss_fn if custom_loss else None)
                val = v if v is not None else val
                if scheduler is not None:
                    scheduler.step()
                if stop:
                    break
        finally:
            bar.close()
    if val_batches is not None and restore_best and result.best_state is not None and not result.stopped_early:
        model.load_state_dict(result.best_state)
    result.time = time.perf_counter() - start
    return result
