"""Block-structured Triton kernels, shared by the ``bsr`` and ``masked`` formats.

A weight W (N, K) is cut into blocks (bh, bw), walked one block row at a time in one of two ways:

* ``LIST``: the stored blocks of block row r are ``crow[r] .. crow[r + 1]`` with block columns
  ``col`` (BSR; for the transposed weight also ``perm``, the stored block each entry comes from).
* occupancy map (``LIST`` false): every tile (r, c) of a dense (N, K) ``values`` matrix, skipped
  when ``occ[r, c]`` is 0, i.e. when the mask of that tile is empty (the ``masked`` format).

Entry (i, j) of block p at block position (r, c) lives at ``p*s_p + r*s_r + c*s_c + i*s_i + j*s_j``
of ``values``: compact BSR values have s_r = s_c = 0, tiles of a dense matrix s_p = 0, and a
transposed weight swaps s_i and s_j. So one kernel serves forward and transposed, BSR and masked.
Blocks are padded to (BH, BW), powers of two of at least 16 for ``tl.dot``. ``UPCAST`` feeds
``tl.dot`` float32 operands: set only for bfloat16 in the interpreter, whose bfloat16 ``tl.dot`` is
wrong in triton 3.9 (bfloat16 products are exact in float32, so the result is the same).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import store_output


@triton.jit
def block_offsets(p, r, c, offs_u, offs_v, s_p, s_r, s_c, s_u, s_v):
    """int64 offsets (U, V) of the entries (offs_u, offs_v) of block p at block position (r, c).

    Every index is widened to int64 before it multiplies a stride: p, r, c may be 32-bit (a loop
    counter such as the block column of the masked walk, whose stride s_c is about N*K in the
    transposed walk), and a product of sizes passes 2**31 on large weights.
    """
    base = tl.cast(p, tl.int64) * s_p + tl.cast(r, tl.int64) * s_r + tl.cast(c, tl.int64) * s_c
    return base + offs_u.to(tl.int64)[:, None] * s_u + offs_v.to(tl.int64)[None, :] * s_v


@triton.jit
def _accumulate(acc, x_rows, b_ok, v_ptr, mask_ptr, p, r, c, offs_i, offs_j, i_ok, K, bw,
                s_p, s_r, s_c, s_i, s_j, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc (BLOCK_B, BH) += x[:, block column c] (BLOCK_B, BW) @ block^T (BW, BH)."""
    k = c * bw + offs_j
    j_ok = (offs_j < bw) & (k < K)
    xt = tl.load(x_rows + k[None, :], mask=b_ok[:, None] & j_ok[None, :], other=0.0)
    off = block_offsets(p, r, c, offs_j, offs_i, s_p, s_r, s_c, s_j, s_i)
    ok = j_ok[:, None] & i_ok[None, :]
    w = tl.load(v_ptr + off, mask=ok, other=0.0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + off, mask=ok, other=0)
        w = tl.where(keep != 0, w, tl.zeros_like(w))
    if UPCAST:
        xt = xt.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(xt, w, acc, input_precision=PRECISION)


@triton.jit
def block_spmm_kernel(
    x_ptr, v_ptr, mask_ptr, perm_ptr, crow_ptr, col_ptr, occ_ptr, bias_ptr, y_ptr,
    B, N, K, bh, bw, n_bcols,
    s_p, s_r, s_c, s_i, s_j,
    LIST: tl.constexpr, HAS_PERM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """y (B, N) = act(x (B, K) @ W^T + bias): program (r, t) computes block row r for the batch
    rows t*BLOCK_B ..; x and y row-major, ``mask`` (uint8, like values) only with HAS_MASK."""
    r = tl.program_id(0).to(tl.int64)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_i = tl.arange(0, BH)
    offs_j = tl.arange(0, BW)
    b_ok = offs_b < B
    rows = r * bh + offs_i
    i_ok = (offs_i < bh) & (rows < N)
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_B, BH), dtype=ACC)
    if LIST:
        for idx in range(tl.load(crow_ptr + r), tl.load(crow_ptr + r + 1)):
            c = tl.load(col_ptr + idx)
            if HAS_PERM:
                p = tl.load(perm_ptr + idx)
            else:
                p = idx
            acc = _accumulate(acc, x_rows, b_ok, v_ptr, mask_ptr, p, r, c, offs_i, offs_j, i_ok, K, bw,
                              s_p, s_r, s_c, s_i, s_j, HAS_MASK, PRECISION, UPCAST)
    else:
        for c in range(0, n_bcols):
            if tl.load(occ_ptr + r * n_bcols + c) != 0:
                acc = _accumulate(acc, x_rows, b_ok, v_ptr, mask_ptr, c * 0, r, c, offs_i, offs_j, i_ok, K,
                                  bw, s_p, s_r, s_c, s_i, s_j, HAS_MASK, PRECISION, UPCAST)
    store_output(acc, y_ptr, bias_ptr, offs_b, rows, b_ok, i_ok, N, HAS_BIAS, ACTIVATION)


@triton.jit
def block_sddmm_kernel(
    a_ptr, c_ptr, rows_ptr, col_ptr, occ_ptr, out_ptr,
    B, N, K, bh, bw, n_bcols, b_chunk, s_split,
    s_p, s_r, s_c, s_i, s_j,
    LIST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """out[block q] = a[:, rows of q]^T (bh, B) @ c[:, cols of q] (B, bw) over the batch range
    [s*b_chunk, (s+1)*b_chunk) of program (q, s), written at ``out + s*s_split`` in the block
    addressing of the module docstring. a (B, N), c (B, K) row-major. With an occupancy map, q runs
    over all tiles and empty ones are left alone (the caller zero-fills)."""
    q = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if LIST:
        r = tl.load(rows_ptr + q)
        c = tl.load(col_ptr + q)
        present = True
    else:
        r = q // n_bcols
        c = q % n_bcols
        present = tl.load(occ_ptr + q) != 0
    if present:
        offs_i = tl.arange(0, BH)
        offs_j = tl.arange(0, BW)
        rows = r * bh + offs_i
        cols = c * bw + offs_j
        i_ok = (offs_i < bh) & (rows < N)
        j_ok = (offs_j < bw) & (cols < K)
        lo = split * b_chunk
        hi = tl.minimum(lo + b_chunk, B)
        acc = tl.zeros((BH, BW), dtype=ACC)
        for b0 in range(lo, hi, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            b_ok = (offs_b < hi)[:, None]
            at = tl.load(a_ptr + offs_b.to(tl.int64)[:, None] * N + rows[None, :], mask=b_ok & i_ok[None, :],
                         other=0.0)
            ct = tl.load(c_ptr + offs_b.to(tl.int64)[:, None] * K + cols[None, :], mask=b_ok & j_ok[None, :],
                         other=0.0)
            if UPCAST:
                at = at.to(tl.float32)
                ct = ct.to(tl.float32)
            acc = tl.dot(tl.trans(at), ct, acc, input_precision=PRECISION)
        off = block_offsets(q, r, c, offs_i, offs_j, s_p, s_r, s_c, s_i, s_j)
        tl.store(out_ptr + split.to(tl.int64) * s_split + off, acc.to(out_ptr.dtype.element_ty),
                 mask=i_ok[:, None] & j_ok[None, :])
