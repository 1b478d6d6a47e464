"""Weight rewinding for prune-retrain cascades (Frankle & Carbin 2019; Frankle et al. 2020).

Before each round's retraining, the surviving weights are reset to earlier values (the masks are
kept): ``θ ← m ⊙ θ_rewind``. :func:`rewinding` wraps a ``fit`` function so that
:func:`sparseode.prune.iterative` rewinds without any change to the cascade itself::

    fit_r = so.prune.rewinding(fit, model, rewind="init")   # or an int k, or a state dict
    so.prune.iterative(model, fit_r, target=0.9, final_fit=so.prune.rewinding(final_fit, ...))

``rewind``:

* ``None``: no rewinding (``fit`` is returned unchanged);
* ``"init"``: the weights ``model`` holds when :func:`rewinding` is called (e.g. the dense
  network before the cascade, or its initialisation if called before dense training);
* ``k`` (int ≥ 0): the weights right after the ``k``-th call of the wrapped ``fit`` (round ``k``'s
  retraining, 0-based); calls ``0..k`` do not rewind (late rewinding to round ``k``);
* a mapping ``name -> tensor`` (a ``state_dict``, pruned ``*_orig`` or plain names both accepted).

Every trainable parameter is rewound (weights and biases); names are matched by logical name
(``layer.weight_orig`` ↔ ``layer.weight``), so snapshots taken before and after pruning match.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from sparseode.pruned import logical_names, pruned_tensor_names

__all__ = ["rewinding", "rewind_to", "snapshot_weights"]

FitFn = Callable[..., Any]


def _logical(name: str) -> str:
    return name[: -len("_orig")] if name.endswith("_orig") else name


def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every parameter, keyed by logical name (``…weight_orig`` → ``…weight``)."""
    names = logical_names(model)
    return {names[n]: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def rewind_to(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into ``model``'s parameters in place (masks untouched: ``θ ← m ⊙ θ_rewind``).

    Raises:
        KeyError: a parameter of ``model`` has no entry in ``weights``.
        ValueError: an entry's shape differs from the parameter's.
    """
    table = {_logical(k): v for k, v in weights.items() if not k.endswith("_mask")}
    names = logical_names(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            key = names[n]
            if key not in table:
                raise KeyError(f"rewind weights have no entry for parameter {key!r}")
            src = table[key]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"rewind weight {key!r} has shape {tuple(src.shape)}, parameter {tuple(p.shape)}")
            p.copy_(src.to(p.device, p.dtype))
        for module in model.modules():  # pruned entries of *_orig stay zero, as prune.apply leaves them
            for t in pruned_tensor_names(module):
                getattr(module, t + "_orig").mul_(getattr(module, t + "_mask"))


def rewinding(fit: FitFn, model: nn.Module, rewind: None | str | int | Mapping[str, torch.Tensor] = "init") -> FitFn:
    """Wrap ``fit(model, callbacks=...)`` so that every call first rewinds the weights (see module doc).

    Raises:
        ValueError: ``rewind`` is not ``None``, ``"init"``, an int ≥ 0 or a mapping.
    """
    if rewind is None:
        return fit
    target: dict[str, Any] = {}
    if isinstance(rewind, str):
        if rewind != "init":
            raise ValueError(f"rewind must be None, 'init', an int >= 0 or a state dict, got {rewind!r}")
        target["w"] = snapshot_weights(model)
        k = -1
    elif isinstance(rewind, bool) or (isinstance(rewind, int) and rewind < 0):
        raise ValueError(f"rewind must be None, 'init', an int >= 0 or a state dict, got {rewind!r}")
    elif isinstance(rewind, int):
        k = rewind
    elif isinstance(rewind, Mapping):
        target["w"] = dict(rewind)
        k = -1
    else:
        raise ValueError(f"rewind must be None, 'init', an int >= 0 or a state dict, got {type(rewind).__name__}")
    calls = [0]

    @functools.wraps(fit)
    def _fit(m: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if "w" in target:
            rewind_to(m, target["w"])
        result = fit(m, *args, **kwargs)
        if calls[0] == k:
            target["w"] = snapshot_weights(m)
        calls[0] += 1
        return result

    return _fit
