"""Sparse weight formats and the three primitives (spmm, spmm_t, sddmm) with their backends."""
from sparseode.ops.formats import FORMATS, SparseWeight
from sparseode.ops.registry import ACTIVATIONS, sddmm, spmm, spmm_t

__all__ = ["FORMATS", "SparseWeight", "ACTIVATIONS", "spmm", "spmm_t", "sddmm"]
