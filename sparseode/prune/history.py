"""What a prune-retrain cascade did: one :class:`RoundRecord` per round in a :class:`PruneHistory`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["RoundRecord", "PruneHistory"]


@dataclass
class RoundRecord:
    """One prune-retrain round.

    ``val_metric`` is the round's validation metric: ``iterative``'s ``evaluate(model)`` when
    given, else the fit result's ``val_metric``/``best_val``; NaN when there is neither (no
    validation data), shown as ``-`` in :meth:`PruneHistory.table` and ``None`` in
    :meth:`PruneHistory.to_dicts`.
    """

    round: int
    target_sparsity: float   # the schedule's sparsity for the round
    sparsity: float          # measured after pruning (all prunable layers)
    val_metric: float        # after retraining (NaN without evaluation: see the class doc)
    steps: int               # optimiser steps of the retraining
    epochs: float            # epochs of the retraining (steps / steps-per-epoch when known)
    time_s: float            # wall time of the round (scoring + pruning + retraining + eval)
    stop_reason: str         # "consistent" | "recovered" | "max_epochs" | "budget" (ran to the fit's end)
    final: bool = False
    sparse: bool = False     # retrained on the sparsified model (iterative's sparse=)
    lr_start: float = math.nan  # learning rate of the retraining's first / last optimiser step
    lr_end: float = math.nan    # (NaN when the fit calls no callback)
    checks: list[dict[str, Any]] = field(default_factory=list, repr=False)


_KEYS = ("round", "target_sparsity", "sparsity", "val_metric", "steps", "epochs", "time_s", "stop_reason", "final",
         "sparse", "lr_start", "lr_end")
_NULLABLE = ("val_metric", "lr_start", "lr_end")  # NaN <-> None in JSON


def _num(v: float, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{v:{width}.{digits}f}"


@dataclass
class PruneHistory:
    """What :func:`iterative` did; ``checkpoints[k]`` is the state dict after round ``k``
    (rounds run before a resume have none: ``checkpoints`` holds the rounds run by this call)."""

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
        """JSON-ready rounds (``val_metric`` None where there was no evaluation, the ``lr_*`` None
        where they are unknown)."""
        out = []
        for r in self.rounds:
            d = {k: getattr(r, k) for k in _KEYS}
            for k in _NULLABLE:
                if isinstance(d[k], float) and math.isnan(d[k]):
                    d[k] = None
            out.append(d)
        return out

    @classmethod
    def from_dicts(cls, rounds: list[dict[str, Any]], dense_metric: float | None = None) -> PruneHistory:
        """The history of :meth:`to_dicts` (checks and checkpoints are not kept)."""
        names = {f.name for f in fields(RoundRecord)}
        recs = [RoundRecord(**{k: (math.nan if k in _NULLABLE and v is None else v)
                               for k, v in d.items() if k in names}) for d in rounds]
        return cls(rounds=recs, dense_metric=math.nan if dense_metric is None else dense_metric)

    def table(self) -> str:
        """One line per round; ``val`` is ``-`` where there was no validation metric."""
        lines = [f"{'round':>5} {'sparsity':>8} {'val':>10} {'epochs':>7} {'steps':>6} {'time_s':>7} {'form':>6}  stop"]
        if not math.isnan(self.dense_metric):
            lines.append(f"{'dense':>5} {0.0:8.4f} {self.dense_metric:10.4f}")
        for r in self.rounds:
            lines.append(f"{r.round:>5} {r.sparsity:8.4f} {_num(r.val_metric, 10, 4)} {r.epochs:7.2f} "
                         f"{r.steps:>6} {r.time_s:7.1f} {'sparse' if r.sparse else 'masked':>6}  {r.stop_reason}")
        lines.append(f"total epochs {self.total_epochs:.2f}, steps {self.total_steps}, "
                     f"time {self.total_time:.1f}s")
        if self.rounds and all(math.isnan(r.val_metric) for r in self.rounds):
            lines.append("val: - (no validation metric: pass evaluate=, or val_data= to the fit)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
