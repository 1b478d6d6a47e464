"""Pruning: importance scores → masks → prune-retrain cascades with early stopping → analysis.

``importance`` scores every trainable parameter (registry :data:`MEASURES`), ``apply`` turns
scores into masks in the ``torch.nn.utils.prune`` layout (registry :data:`GRANULARITIES`),
``iterative`` runs the prune-retrain cascade, ``ICP`` stops its intermediate rounds early
(registry :data:`ICP_MEASURES`; ``connectivity``/``gradient_flow`` are the published
ICP flows), ``hessian_spectrum``/``mode_coverage`` analyse pruned flows.
"""
from __future__ import annotations

from sparseode.prune.analysis import HessianSpectrum, hessian_spectrum, mode_coverage
from sparseode.prune.icp import ICP, ICP_MEASURES, DiscrepancyMeasure, fixed_step, register_icp_measure
from sparseode.prune.connectivity import ConnectivityMeasure, connectivity, gradient_flow
from sparseode.prune.importance import MEASURES, Measure, importance, register_measure
from sparseode.prune.checkpoint import clone, load_pruned
from sparseode.prune.granularity import GRANULARITIES, register_granularity
from sparseode.prune.layers import neuron_chains, prunable_layers
from sparseode.prune.masking import apply, remove
from sparseode.prune.neuron_schedule import neuron_density, neuron_schedule
from sparseode.prune.report import LayerSparsity, SparsityReport, sparsity
from sparseode.pruned import masks
from sparseode.prune.pq import pq_index, pq_keep_ratio, pq_next_keep
from sparseode.prune.rewind import rewinding
from sparseode.prune.schedule import PruneHistory, RoundRecord, default_schedule, iterative, one_shot

__all__ = [
    "importance", "apply", "sparsity", "remove", "iterative", "one_shot", "default_schedule",
    "ICP", "hessian_spectrum", "mode_coverage", "masks", "load_pruned", "clone", "prunable_layers",
    "neuron_chains", "fixed_step", "MEASURES", "Measure", "register_measure", "GRANULARITIES",
    "register_granularity", "ICP_MEASURES", "register_icp_measure", "DiscrepancyMeasure",
    "SparsityReport", "LayerSparsity", "PruneHistory", "RoundRecord", "HessianSpectrum",
    "connectivity", "gradient_flow", "ConnectivityMeasure", "pq_index", "pq_keep_ratio", "pq_next_keep",
    "rewinding", "neuron_density", "neuron_schedule",
]
