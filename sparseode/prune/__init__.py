"""Pruning: importance scores → masks → prune-retrain cascades with early stopping → analysis."""
from __future__ import annotations

from sparseode.prune.importance import MEASURES, Measure, importance, register_measure
from sparseode.prune.masks import (
    GRANULARITIES,
    LayerSparsity,
    SparsityReport,
    apply,
    load_pruned,
    masks,
    neuron_chains,
    prunable_layers,
    register_granularity,
    remove,
    sparsity,
)

__all__ = [
    "importance", "apply", "sparsity", "remove", "masks", "load_pruned", "prunable_layers",
    "neuron_chains", "MEASURES", "Measure", "register_measure", "GRANULARITIES",
    "register_granularity", "SparsityReport", "LayerSparsity",
]
