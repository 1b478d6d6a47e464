"""Sparse layers and model conversion."""
from sparseode.nn.convert import densify, plan_formats, sparsify
from sparseode.nn.sparse_linear import SparseLinear

__all__ = ["SparseLinear", "sparsify", "densify", "plan_formats"]
