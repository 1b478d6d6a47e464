"""Dense-product semantics for NaN/Inf inputs, shared by every spmm kernel.

In the dense product x W^T, a NaN or Inf in x[b, k] meets every zero W[n, k] and gives NaN
(0 * Inf = NaN). The sparse kernels never read the columns a row does not store, so this pass runs
after them: a batch row of x with a non-finite value poisons, with NaN, every output block row
that does not store all of that batch row's non-finite entries (the ones it stores went through
the arithmetic already). A batch tile that is all finite costs one read of x.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import nonfinite


@triton.jit
def poison_nonfinite_kernel(
    x_ptr, crow_ptr, col_ptr, occ_ptr, y_ptr,
    B, K, N, bh, bw, n_brows, n_bcols,
    LIST: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Program t: batch rows t*BLOCK_B ..; x (B, K) and y (B, N) row-major. The structure is walked
    as in block.py (block list or occupancy map), BLOCKS blocks at a time."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * K
    total = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_rows + offs[None, :], mask=b_ok[:, None] & (offs < K)[None, :], other=0.0)
        total += tl.sum(nonfinite(v).to(tl.int32), axis=1)
    if tl.max(total) > 0:
        offs_j = tl.arange(0, BW)
        offs_i = tl.arange(0, BH)
        for r in range(0, n_brows):
            if LIST:
                lo = tl.load(crow_ptr + r)
                hi = tl.load(crow_ptr + r + 1)
            else:
                lo = 0
                hi = n_bcols
            stored = tl.zeros((BLOCK_B,), dtype=tl.int32)
            for t in range(lo, hi, BLOCKS):
                idx = t + tl.arange(0, BLOCKS)
                ok = idx < hi
                if LIST:
                    c = tl.load(col_ptr + idx, mask=ok, other=0)
                else:
                    c = idx
                    ok = ok & (tl.load(occ_ptr + r * n_bcols + idx, mask=ok, other=0) != 0)
                k = c[:, None] * bw + offs_j[None, :]  # (BLOCKS, BW)
                m = ok[:, None] & (offs_j < bw)[None, :] & (k < K)
                v = tl.load(x_rows[:, :, None] + k[None, :, :], mask=b_ok[:, None, None] & m[None, :, :], other=0.0)
                stored += tl.sum(tl.sum(nonfinite(v).to(tl.int32), axis=2), axis=1)
            rows = r * bh + offs_i
            poison = (stored < total)[:, None] & ((offs_i < bh) & (rows < N))[None, :]
            nan = tl.full((BLOCK_B, BH), float("nan"), y_ptr.dtype.element_ty)
            tl.store(y_ptr + offs_b.to(tl.int64)[:, None] * N + rows[None, :], nan, mask=poison & b_ok[:, None])
