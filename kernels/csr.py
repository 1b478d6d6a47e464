"""CSR (unstructured) Triton kernels: gathers along the stored columns.

The dense operand is read feature-major (xT (K, B), batch contiguous), so that the gather of one
stored column over a batch tile is one contiguous load. Output rows are visited in ``order`` (rows
sorted by length, longest first), so that the rows a program handles together have similar lengths
and the padding of the (ROWS, BLOCK_NNZ) tiles stays small.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import store_output


@triton.jit
def csr_spmm_kernel(
    xT_ptr, v_ptr, perm_ptr, crow_ptr, col_ptr, order_ptr, bias_ptr, y_ptr,
    B, N, K,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_NNZ: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """y (B, N) = act(x @ W^T + bias) for W in CSR (crow (N+1,), col (nnz,), values (nnz,)); with
    HAS_PERM the stored value of entry e is ``values[perm[e]]``. Program (g, t): rows
    order[g*ROWS ..] for batch rows t*BLOCK_B ..; xT (K, B). K only keys the tuning."""
    slot = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    slot_ok = slot < N
    rows = tl.load(order_ptr + slot, mask=slot_ok, other=0)
    start = tl.load(crow_ptr + rows, mask=slot_ok, other=0)
    end = tl.load(crow_ptr + rows + 1, mask=slot_ok, other=0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    acc = tl.zeros((BLOCK_B, ROWS), dtype=ACC)
    for t in range(0, tl.max(end - start), BLOCK_NNZ):
        idx = start[:, None] + t + tl.arange(0, BLOCK_NNZ)[None, :]
        ok = idx < end[:, None]
        if HAS_PERM:
            src = tl.load(perm_ptr + idx, mask=ok, other=0)
        else:
            src = idx
        v = tl.load(v_ptr + src, mask=ok, other=0.0).to(ACC)
        c = tl.load(col_ptr + idx, mask=ok, other=0).to(tl.int64)  # c * B passes 2**31 on large inputs
        xg = tl.load(xT_ptr + c[None, :, :] * B + offs_b[:, None, None], mask=ok[None, :, :] & b_ok[:, None, None],
                     other=0.0).to(ACC)
        acc += tl.sum(xg * v[None, :, :], axis=2)
    store_output(acc, y_ptr, bias_ptr, offs_b, rows, b_ok, slot_ok, N, HAS_BIAS, ACTIVATION)


@triton.jit
def csr_sddmm_kernel(
    aT_ptr, cT_ptr, rows_ptr, col_ptr, out_ptr,
    B, nnz, b_chunk, s_split,
    ACC: tl.constexpr, BLOCK_NNZ: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """out[e] = sum_b a[b, rows[e]] * c[b, col[e]] over the batch range [s*b_chunk, (s+1)*b_chunk)
    of program (g, s), written at ``out + s*s_split``; aT (N, B), cT (K, B)."""
    idx = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    split = tl.program_id(1)
    ok = idx < nnz
    r = tl.load(rows_ptr + idx, mask=ok, other=0).to(tl.int64)  # r * B and c * B pass 2**31 on large inputs
    c = tl.load(col_ptr + idx, mask=ok, other=0).to(tl.int64)
    lo = split * b_chunk
    hi = tl.minimum(lo + b_chunk, B)
    acc = tl.zeros((BLOCK_NNZ,), dtype=ACC)
    for b0 in range(lo, hi, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        m = ok[:, None] & (offs_b < hi)[None, :]
        av = tl.load(aT_ptr + r[:, None] * B + offs_b[None, :], mask=m, other=0.0).to(ACC)
        cv = tl.load(cT_ptr + c[:, None] * B + offs_b[None, :], mask=m, other=0.0).to(ACC)
        acc += tl.sum(av * cv, axis=1)
    tl.store(out_ptr + split.to(tl.int64) * s_split + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)
