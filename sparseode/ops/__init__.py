"""Sparse weight formats and the primitives (spmm, spmm_fm, spmm_t, sddmm), one ``torch.library``
op per primitive and format, with the backend of each device chosen by an explicit setting."""
from sparseode.ops.formats import SparseWeight
from sparseode.ops.handlers import FORMATS
from sparseode.ops.library import ACTIVATIONS
from sparseode.ops.patterns import BSRPattern, CSRPattern, MaskedPattern
from sparseode.ops.primitives import sddmm, spmm, spmm_fm, spmm_t
from sparseode.ops.select import active as active_backend
from sparseode.ops.select import set_backend, set_gpu_backend, use_backend
from sparseode.ops.validate import PatternError

__all__ = ["FORMATS", "SparseWeight", "ACTIVATIONS", "spmm", "spmm_fm", "spmm_t", "sddmm", "MaskedPattern",
           "CSRPattern", "BSRPattern", "PatternError", "set_backend", "set_gpu_backend", "use_backend",
           "active_backend"]
