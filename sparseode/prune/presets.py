"""Named keep-ratio schedules of :func:`sparseode.prune.iterative` (``schedule="<name>"``): the
prune-retrain cascades of the Sparse Flows paper (Liebenwein et al. 2021, "Sparse Flows: Pruning
Continuous-depth Models").

A schedule is a list of keep ratios (kept share of the prunable weights after each round, so the
round's sparsity is ``1 − keep``), non-increasing. The presets, as the paper's code defines them
(github.com/lucaslie/torchprune, ``paper/node/param``: each experiment's ``spacing``; a
``geometric`` spacing is ``numpy.geomspace(maxVal, minVal, numIntervals)``, both ends included,
a ``linear`` one ``numpy.linspace``):

* ``"sparse_flows"`` (29 rounds, to 98%): the toy flows' cascade, geometric 0.80 → 0.20 in 20
  steps, then linear 0.18 → 0.02 in 9;
* ``"sparse_flows_8"`` (8 rounds, to 90%): the tabular cascade of POWER, GAS and BSDS300,
  geometric 0.70 → 0.10 in 8 steps;
* ``"sparse_flows_12"`` (12 rounds, to 95%): the tabular cascade of HEPMASS (and, before its 4
  extra linear steps 0.04 → 0.01, of MINIBOONE), geometric 0.80 → 0.05 in 12 steps.

In every round of the paper the retraining reuses the training's optimiser settings and
learning-rate schedule from its start (``retraining: startEpoch: 0``): a warm restart, which is what
:func:`iterative` does with a ``fit`` that builds its optimiser and schedule per call, as
:func:`sparseode.train.fit` does.
"""
from __future__ import annotations

from sparseode.args import check_sparsity

__all__ = ["PRESETS", "preset", "truncate", "geometric", "linear"]


def geometric(start: float, stop: float, n: int) -> list[float]:
    """``n`` ratios from ``start`` to ``stop`` (both included) with a constant factor (``geomspace``)."""
    return [start * (stop / start) ** (k / (n - 1)) for k in range(n)] if n > 1 else [start]


def linear(start: float, stop: float, n: int) -> list[float]:
    """``n`` ratios from ``start`` to ``stop`` (both included), equally spaced (``linspace``)."""
    return [start + (stop - start) * k / (n - 1) for k in range(n)] if n > 1 else [start]


#: name -> the preset's keep ratios (full length; :func:`preset` truncates at a target).
PRESETS: dict[str, tuple[float, ...]] = {
    "sparse_flows": tuple(round(k, 12) for k in geometric(0.80, 0.20, 20) + linear(0.18, 0.02, 9)),
    "sparse_flows_8": tuple(round(k, 12) for k in geometric(0.70, 0.10, 8)),
    "sparse_flows_12": tuple(round(k, 12) for k in geometric(0.80, 0.05, 12)),
}


def truncate(keep: list[float] | tuple[float, ...], target: float) -> list[float]:
    """The keep ratios down to ``1 − target`` (inclusive); ``1 − target`` is appended as the last
    ratio where it falls between two of them, so the schedule ends exactly at ``target``."""
    keep_min = 1.0 - target
    out = [k for k in keep if k >= keep_min - 1e-9]
    if not out or abs(out[-1] - keep_min) > 1e-9:
        out.append(keep_min)
    return [round(k, 12) for k in out]


def preset(name: str, target: float | None = None) -> list[float]:
    """The keep ratios of preset ``name``, truncated at ``target`` (None: the whole preset).

    Raises:
        ValueError: ``name`` is not a preset (the message lists them), or ``target`` lies beyond
            the preset's last sparsity (a preset is not extended past its end).
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"schedule={name!r} is not a preset; choose one of {sorted(PRESETS)} (or 'pq', "
                         "or a list of keep ratios)")
    keep = PRESETS[name]
    if target is None:
        return list(keep)
    target = check_sparsity(target, "target")
    end = 1.0 - keep[-1]
    if target > end + 1e-9:
        raise ValueError(f"target={target} lies beyond schedule={name!r}, which ends at sparsity {end:.4g}: "
                         f"pass target <= {end:.4g} (or leave it out), or another schedule")
    return truncate(keep, target)
