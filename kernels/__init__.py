"""Triton kernels of sparseode, installed as ``sparseode.kernels``.

* ``block.py``: block-structured matmuls on ``tl.dot`` for the ``bsr`` format (stored-block lists)
  and the ``masked`` format (dense values walked in tiles, empty tiles skipped);
* ``csr.py``: gather kernels for unstructured ``csr`` weights;
* ``epilogue.py``: the fused bias + activation epilogue; ``nonfinite.py``: dense NaN/Inf semantics;
* ``tuning.py``: autotuned launch configurations (one fixed configuration in the interpreter);
* ``grid.py``: the launch-grid limits every launch is checked against;
* ``launch.py``: the entry points, one per format and primitive;
* ``field.py``: the fused MLP field (every layer of a field in one kernel, tangents and trace) and
  its backward's two feature-major products; ``field_launch.py`` their entry points,
  ``field_backward.py`` the field's backward on the GPU, ``field_register.py`` their registration
  as the CUDA kernels of ``sparseode::mlp_field`` and ``sparseode::mlp_field_backward``.

Importing this package does not import triton: ``sparseode.ops.triton`` imports ``launch`` (and
with it triton and the kernels) on first use.
"""
