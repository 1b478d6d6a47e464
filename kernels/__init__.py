"""Triton kernels of sparseode, installed as ``sparseode.kernels``.

* ``block.py``: block-structured matmuls on ``tl.dot`` for the ``bsr`` format (stored-block lists)
  and the ``masked`` format (dense values walked in tiles, empty tiles skipped);
* ``csr.py``: gather kernels for unstructured ``csr`` weights;
* ``epilogue.py``: the fused bias + activation epilogue; ``nonfinite.py``: dense NaN/Inf semantics;
* ``tuning.py``: autotuned launch configurations (one fixed configuration in the interpreter);
* ``grid.py``: the launch-grid limits every launch is checked against;
* ``launch.py``: the entry points, one per format and primitive.

Importing this package does not import triton: ``sparseode.ops.triton`` imports ``launch`` (and
with it triton and the kernels) on first use.
"""
