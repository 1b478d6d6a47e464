"""Losses and evaluation of flows and classifiers: NLL in nats and bits/dim, accuracy."""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from sparseode import distributed
from sparseode.batching import Batches, Data, to_device
from sparseode.losses import LossFn, default_loss, is_flow

__all__ = ["evaluate", "default_loss", "bits_per_dim", "LossFn"]


def model_device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return p.device if p is not None else None


def nfe_of(model: nn.Module) -> int | None:
    nfe = getattr(model, "nfe", None)
    return int(nfe) if isinstance(nfe, (int, float)) else None


def bits_per_dim(nll: float, dims: int, scale: float = 1.0) -> float:
    """Bits per dimension of an NLL in nats over ``dims`` dimensions, for data that was multiplied
    by ``scale`` before modelling (e.g. ``1/17`` for dequantised digits):
    ``(nll - dims * log(scale)) / (dims * log 2)``."""
    return (nll - dims * math.log(scale)) / (dims * math.log(2))


_SUMS = ("nll", "correct", "ce", "loss", "rows", "nfe", "nfe_n", "dims")


def _sums(model: nn.Module, batches: Batches, loss_fn: LossFn | None, sharded: bool) -> dict[str, float]:
    """Sample-weighted sums over the (this rank's share of the) data, summed over the ranks."""
    device = model_device(model)
    flow = is_flow(model)
    s = dict.fromkeys(_SUMS, 0.0)
    with torch.no_grad():
        for batch, _ in (batches.iterate_shards() if sharded else ((b, 0) for b in batches.iterate())):
            batch = to_device(batch, device)
            n = batch[0].shape[0]
            if flow:
                s["nll"] += float(-model.log_prob(batch[0]).sum())
                s["dims"] = batch[0][0].numel()
            elif len(batch) >= 2:
                logits = model(batch[0])
                s["ce"] += float(F.cross_entropy(logits, batch[1], reduction="sum"))
                s["correct"] += float((logits.argmax(-1) == batch[1]).sum())
            if (nfe := nfe_of(model)) is not None:
                s["nfe"] += nfe
                s["nfe_n"] += 1
            if loss_fn is not None:
                s["loss"] += float(loss_fn(model, batch)) * n
            s["rows"] += n
    if sharded and distributed.is_distributed():
        dims = s.pop("dims")
        (vec,), _ = distributed.sum_over_ranks([torch.tensor([s[k] for k in _SUMS if k != "dims"],
                                                             dtype=torch.float64, device=device)])
        s = dict(zip([k for k in _SUMS if k != "dims"], vec.tolist()))
        s["dims"] = max(distributed.broadcast_object(dims), dims)
    return s


def evaluate(
    model: nn.Module,
    data: Data,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 1024,
    dims: int | None = None,
    scale: float = 1.0,
    sharded: bool = False,
) -> dict[str, float]:
    """Evaluate a flow or a classifier without gradients (model in eval mode, mode restored).

    Flows (models with ``log_prob``): ``{"nll": mean -log p in nats, "bpd": bits/dim, "nfe": ...}``
    with ``dims`` defaulting to the data's last dimension and ``scale`` the factor the data were
    multiplied by (use ``dims=64, scale=sparseode.data.DIGITS_SCALE`` for dequantised digits).
    Classifiers: ``{"accuracy": fraction correct, "loss": mean cross-entropy, "nfe": ...}``.
    With a custom ``loss_fn`` a ``"loss"`` entry (its sample-weighted mean) is added as well.
    ``nfe`` is the mean field evaluations per batch (absent for models without ``nfe``).
    ``sharded``: under ``torchrun``, every rank evaluates its share of each batch and the sums
    are all-reduced (every rank must call it; the result is the same on all of them).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    batches = data if isinstance(data, Batches) else Batches(data, batch_size, "data")
    was_training = model.training
    model.eval()
    try:
        s = _sums(model, batches, loss_fn, sharded)
    finally:
        model.train(was_training)
    total = s["rows"]
    if total == 0:
        raise ValueError("data is empty")
    out: dict[str, float] = {}
    if is_flow(model):
        out["nll"] = s["nll"] / total
        out["bpd"] = bits_per_dim(out["nll"], dims if dims is not None else int(s["dims"]), scale)
    elif loss_fn is None:
        out["accuracy"] = s["correct"] / total
        out["loss"] = s["ce"] / total
    if loss_fn is not None:
        out["loss"] = s["loss"] / total
    if s["nfe_n"]:
        out["nfe"] = s["nfe"] / s["nfe_n"]
    if not out:
        raise ValueError("cannot evaluate: the model has no log_prob, the data has no labels and no loss_fn was given")
    return out


def val_metric(result: dict[str, float], custom_loss: bool) -> float:
    """The number ``fit`` minimises on validation data: the custom loss, else NLL or cross-entropy."""
    if custom_loss:
        return result["loss"]
    return result["nll"] if "nll" in result else result["loss"]
