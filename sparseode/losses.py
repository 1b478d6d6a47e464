"""The default losses of the package's models, shared by training and pruning.

A loss function is ``loss_fn(model, batch) -> scalar tensor`` with ``batch`` a tuple of tensors.
:func:`default_loss` picks one by model kind: mean NLL for flows (anything with ``log_prob``, e.g.
``CNF``), cross-entropy for classifiers (``ODEClassifier``, any model returning logits).
``sparseode.train`` and ``sparseode.prune`` both read it here, so neither imports the other to
find a loss. This module imports only torch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossFn", "is_flow", "nll_loss", "cross_entropy_loss", "default_loss", "resolve_loss"]

Batch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Batch], Tensor]


def is_flow(model: nn.Module) -> bool:
    """True for models with a ``log_prob`` method (density models: trained by NLL)."""
    return callable(getattr(model, "log_prob", None))


def nll_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean negative log-likelihood ``-model.log_prob(x).mean()`` of ``x = batch[0]``, in nats."""
    return -model.log_prob(batch[0]).mean()


def cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Cross-entropy of the logits ``model(x)`` ``(n, classes)`` against labels ``y`` ``(n,)``."""
    if len(batch) < 2:
        raise ValueError("a classifier needs labelled data: pass data=(X, y)")
    return F.cross_entropy(model(batch[0]), batch[1])


def default_loss(model: nn.Module) -> LossFn:
    """The loss ``fit`` trains ``model`` with: :func:`nll_loss` for flows (anything with
    ``log_prob``, e.g. ``CNF``), :func:`cross_entropy_loss` otherwise (``ODEClassifier``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return nll_loss if is_flow(model) else cross_entropy_loss


def resolve_loss(model: nn.Module, loss_fn: LossFn | None, caller: str) -> LossFn:
    """``loss_fn`` if given (it must be callable), else :func:`default_loss` of ``model``.

    ``caller`` names the function or method asking, for the error message.
    """
    if loss_fn is None:
        return default_loss(model)
    if not callable(loss_fn):
        raise TypeError(
            f"{caller}: loss_fn must be a callable loss_fn(model, batch) -> scalar tensor, "
            f"got {type(loss_fn).__name__}"
        )
    return loss_fn
