"""Training and evaluation loops for flows and classifiers.

``fit`` runs AdamW with optional LR milestones, shows a tqdm bar (epoch, loss, NFE), validates
each epoch, keeps (and optionally checkpoints) the best model, is deterministic for a seed, and
calls ``callbacks`` after every optimiser step (pruning uses them to keep masks applied and to
stop early). ``evaluate`` reports NLL in nats and bits/dim for flows, accuracy for classifiers.

Data given to ``fit``/``evaluate`` is a Tensor ``(n, ...)`` (unsupervised: flows), a tuple
``(X, y)`` of tensors with the same first dimension, or a re-iterable of batches (a list, a
``DataLoader``; each batch a tensor or a tuple/list of tensors). Batches handed to a loss
function are always tuples.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fit", "evaluate", "default_loss", "FitState", "FitResult", "bits_per_dim"]

Batch = tuple[Tensor, ...]
Data = Union[Tensor, tuple, list, Iterable]
LossFn = Callable[[nn.Module, Batch], Tensor]


@dataclass
class FitState:
    """What a callback sees after every optimiser step.

    ``epoch`` is 0-based; ``step`` counts optimiser steps from 1; ``loss`` is this step's loss;
    ``val_metric`` the latest validation metric (lower is better) or None; ``history`` the
    per-epoch records so far.
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


# -- losses ------------------------------------------------------------------------------------
def _is_flow(model: nn.Module) -> bool:
    return callable(getattr(model, "log_prob", None))


def _nll_loss(model: nn.Module, batch: Batch) -> Tensor:
    return -model.log_prob(batch[0]).mean()


def _cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    if len(batch) < 2:
        raise ValueError("a classifier needs labelled data: pass data=(X, y)")
    return F.cross_entropy(model(batch[0]), batch[1])


def default_loss(model: nn.Module) -> LossFn:
    """The loss ``fit`` uses for a model: mean NLL ``-log_prob(x).mean()`` for flows (anything
    with ``log_prob``, e.g. ``CNF``), cross-entropy of ``model(x)`` against ``y`` otherwise
    (``ODEClassifier``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _nll_loss if _is_flow(model) else _cross_entropy_loss


# -- data --------------------------------------------------------------------------------------
def _check_finite(t: Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _as_tuple(batch: Any, name: str) -> Batch:
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(torch.is_tensor(b) for b in batch):
        return tuple(batch)
    raise TypeError(f"{name} must yield tensors or tuples of tensors, got {type(batch).__name__}")


class _Batches:
    """Re-iterable batches over a Tensor, a tuple of tensors, or an iterable of batches."""

    def __init__(self, data: Data, batch_size: int, name: str) -> None:
        self.name = name
        self.batch_size = batch_size
        self.tensors: Batch | None = None
        self.iterable: Iterable | None = None
        if torch.is_tensor(data) or (isinstance(data, tuple) and data and all(torch.is_tensor(d) for d in data)):
            tensors = _as_tuple(data, name)
            n = tensors[0].shape[0] if tensors[0].dim() else 0
            if n == 0:
                raise ValueError(f"{name} is empty")
            for t in tensors:
                if t.dim() == 0 or t.shape[0] != n:
                    raise ValueError(f"{name}: all tensors need the same first dimension, got "
                                     f"{[tuple(x.shape) for x in tensors]}")
                _check_finite(t, name)
            self.tensors = tensors
        elif isinstance(data, Iterable):
            if iter(data) is data:
                raise TypeError(f"{name} is a one-shot iterator; pass a re-iterable (list, DataLoader)")
            self.iterable = data
        else:
            raise TypeError(f"{name} must be a Tensor, a tuple (X, y) of tensors or an iterable of batches, "
                            f"got {type(data).__name__}")

    def __len__(self) -> int:
        if self.tensors is not None:
            return math.ceil(self.tensors[0].shape[0] / self.batch_size)
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            return 0

    def iterate(self, generator: torch.Generator | None = None) -> Iterator[Batch]:
        if self.tensors is not None:
            n = self.tensors[0].shape[0]
            order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                yield tuple(t[idx.to(t.device)] for t in self.tensors)
        else:
            for batch in self.iterable:  # type: ignore[union-attr]
                b = _as_tuple(batch, self.name)
                for t in b:
                    _check_finite(t, self.name)
                yield b


def _device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return p.device if p is not None else None


def _to(batch: Batch, device: torch.device | None) -> Batch:
    return batch if device is None else tuple(t.to(device) for t in batch)


def _nfe(model: nn.Module) -> int | None:
    nfe = getattr(model, "nfe", None)
    return int(nfe) if isinstance(nfe, (int, float)) else None


def bits_per_dim(nll: float, dims: int, scale: float = 1.0) -> float:
    """Bits per dimension of an NLL in nats over ``dims`` dimensions, for data that was multiplied
    by ``scale`` before modelling (e.g. ``1/17`` for dequantised digits):
    ``(nll - dims * log(scale)) / (dims * log 2)``."""
    return (nll - dims * math.log(scale)) / (dims * math.log(2))


# -- evaluation --------------------------------------------------------------------------------
def evaluate(
    model: nn.Module,
    data: Data,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 1024,
    dims: int | None = None,
    scale: float = 1.0,
) -> dict[str, float]:
    """Evaluate a flow or a classifier without gradients (model in eval mode, mode restored).

    Flows (models with ``log_prob``): ``{"nll": mean -log p in nats, "bpd": bits/dim, "nfe": ...}``
    with ``dims`` defaulting to the data's last dimension and ``scale`` the factor the data were
    multiplied by (use ``dims=64, scale=sparseode.data.DIGITS_SCALE`` for dequantised digits).
    Classifiers: ``{"accuracy": fraction correct, "loss": mean cross-entropy, "nfe": ...}``.
    With a custom ``loss_fn`` a ``"loss"`` entry (its sample-weighted mean) is added as well.
    ``nfe`` is the mean field evaluations per batch (absent for models without ``nfe``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    batches = _Batches(data, batch_size, "data")
    device = _device(model)
    flow = _is_flow(model)
    was_training = model.training
    model.eval()
    total = 0
    sums: dict[str, float] = {"nll": 0.0, "correct": 0.0, "ce": 0.0, "loss": 0.0}
    nfes: list[int] = []
    d = None
    try:
        with torch.no_grad():
            for batch in batches.iterate():
                batch = _to(batch, device)
                n = batch[0].shape[0]
                if flow:
                    sums["nll"] += float(-model.log_prob(batch[0]).sum())
                    d = batch[0][0].numel()
                elif len(batch) >= 2:
                    logits = model(batch[0])
                    sums["ce"] += float(F.cross_entropy(logits, batch[1], reduction="sum"))
                    sums["correct"] += float((logits.argmax(-1) == batch[1]).sum())
                if (nfe := _nfe(model)) is not None:
                    nfes.append(nfe)
                if loss_fn is not None:
                    sums["loss"] += float(loss_fn(model, batch)) * n
                total += n
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("data is empty")
    out: dict[str, float] = {}
    if flow:
        out["nll"] = sums["nll"] / total
        out["bpd"] = bits_per_dim(out["nll"], dims if dims is not None else int(d), scale)
    elif loss_fn is None:
        out["accuracy"] = sums["correct"] / total
        out["loss"] = sums["ce"] / total
    if loss_fn is not None:
        out["loss"] = sums["loss"] / total
    if nfes:
        out["nfe"] = sum(nfes) / len(nfes)
    if not out:
        raise ValueError("cannot evaluate: the model has no log_prob, the data has no labels and no loss_fn was given")
    return out


def _val_metric(result: dict[str, float], custom_loss: bool) -> float:
    if custom_loss:
        return result["loss"]
    return result["nll"] if "nll" in result else result["loss"]


# -- fit ---------------------------------------------------------------------------------------
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
    """Train ``model`` with AdamW.

    Args:
        model: e.g. a ``CNF`` or an ``ODEClassifier`` (trained in place).
        data: Tensor (flows), tuple ``(X, y)``, or re-iterable of batches; NaN/inf is rejected.
        loss_fn: ``loss_fn(model, batch: tuple) -> scalar``; default :func:`default_loss`.
        epochs: passes over the data.
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        batch_size: batch size for tensor data (shuffled each epoch with a generator seeded by
            ``seed``).
        milestones, gamma: multiply the LR by ``gamma`` at these epoch indices (MultiStepLR).
        val_data: evaluated after every epoch; its metric (flows: NLL; classifiers: cross-entropy;
            custom ``loss_fn``: that loss; lower is better) selects the best model.
        callbacks: ``cb(FitState) -> bool | None`` after every optimiser step; True stops at once.
        seed: seeds the shuffling and, inside a forked RNG, torch's global RNG (Hutchinson
            probes, base draws), so the same seed and initial model give the same run.
        progress: show a tqdm bar with epoch, loss and NFE.
        checkpoint: path; the best state (``{"state_dict", "epoch", "val"}``) is saved there
            whenever it improves.
        max_steps: stop after this many optimiser steps in total.
        restore_best: with ``val_data``, load the best state back into the model at the end
            (skipped with a warning if the model's structure changed since, e.g. by pruning).
        val_batch_size: batch size used for validation.

    Returns: :class:`FitResult`.

    Raises: ValueError/TypeError for bad arguments or data (naming the argument);
    FloatingPointError if the loss becomes NaN or inf.
    """
    from tqdm.auto import tqdm

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

    batches = _Batches(data, batch_size, "data")
    val_batches = val_data if val_data is None else _Batches(val_data, val_batch_size, "val_data")
    custom_loss = loss_fn is not None
    loss_fn = loss_fn if loss_fn is not None else default_loss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")
    device = _device(model)
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    result = FitResult()
    best_train = math.inf
    start = time.perf_counter()

    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        shuffle = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        scheduler = (torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
                     if milestones else None)
        n_batches = len(batches)
        total = epochs * n_batches if n_batches else None
        if max_steps is not None and total is not None:
            total = min(total, max_steps)
        bar = tqdm(total=total, disable=not progress, desc="fit", dynamic_ncols=True, leave=False)
        val_metric: float | None = None
        stop = False
        try:
            for epoch in range(epochs):
                model.train()
                t0 = time.perf_counter()
                loss_sum, n_seen, nfe_sum, nfe_n = 0.0, 0, 0, 0
                for batch in batches.iterate(shuffle):
                    batch = _to(batch, device)
                    loss = loss_fn(model, batch)
                    if loss.dim() != 0:
                        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {float(loss)} at epoch {epoch}, step {result.steps + 1}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    result.steps += 1
                    value = float(loss.detach())
                    n = batch[0].shape[0]
                    loss_sum += value * n
                    n_seen += n
                    if (nfe := _nfe(model)) is not None:
                        nfe_sum += nfe
                        nfe_n += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{value:.4f}",
                                    nfe=nfe if nfe is not None else "-", refresh=False)
                    state = FitState(model, optimizer, epoch, result.steps, value, val_metric, result.history)
                    if any([bool(cb(state)) for cb in callbacks]):
                        result.stopped_early = stop = True
                    if max_steps is not None and result.steps >= max_steps:
                        stop = True
                    if stop:
                        break
                result.epochs_run = epoch + 1
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "loss": loss_sum / max(n_seen, 1),
                    "val": None,
                    "nfe": nfe_sum / nfe_n if nfe_n else None,
                    "time": time.perf_counter() - t0,
                    "lr": optimizer.param_groups[0]["lr"],
                    "steps": result.steps,
                }
                complete = not result.stopped_early
                scored = complete if val_batches is not None else n_seen > 0
                if scored and result.best_state is not None and set(result.best_state) != set(model.state_dict()):
                    # the structure changed (e.g. pruned by a callback): earlier states no longer apply
                    result.best_val, result.best_epoch, result.best_state, best_train = None, None, None, math.inf
                if val_batches is not None and complete:
                    ev = evaluate(model, val_batches.tensors if val_batches.tensors is not None else val_data,
                                  loss_fn=loss_fn if custom_loss else None, batch_size=val_batch_size)
                    val_metric = _val_metric(ev, custom_loss)
                    record["val"] = val_metric
                    record.update({f"val_{k}": v for k, v in ev.items()})
                    improved = result.best_val is None or val_metric < result.best_val
                    if improved:
                        result.best_val = val_metric
                elif val_batches is None and n_seen:
                    improved = record["loss"] < best_train
                    best_train = min(best_train, record["loss"])
                else:
                    improved = False
                if improved:
                    result.best_epoch = epoch
                    result.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if checkpoint is not None:
                        path = Path(checkpoint)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        torch.save({"state_dict": result.best_state, "epoch": epoch, "val": record["val"],
                                    "loss": record["loss"]}, path)
                        result.checkpoint = str(path)
                result.history.append(record)
                bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}",
                                val="-" if record["val"] is None else f"{record['val']:.4f}",
                                nfe="-" if record["nfe"] is None else f"{record['nfe']:.0f}")
                if scheduler is not None:
                    scheduler.step()
                if stop:
                    break
        finally:
            bar.close()

    if val_batches is not None and restore_best and result.best_state is not None:
        current = model.state_dict()
        if set(current) == set(result.best_state) and all(
                current[k].shape == v.shape for k, v in result.best_state.items()):
            model.load_state_dict(result.best_state)
        else:
            warnings.warn("fit: the model's structure changed during training (e.g. pruned by a callback); "
                          "the best state was not restored", stacklevel=2)
    result.time = time.perf_counter() - start
    return result
