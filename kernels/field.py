"""The fused MLP vector field as one Triton kernel: the GPU mirror of csrc/cpu/field_kernels.h.

One program owns a batch tile of BLOCK_B samples at a time (a persistent grid: program p takes
tiles p, p + P, ...) and runs every layer on it. Between layers the tile lives feature-major in two
ping-pong panels of a per-program scratch buffer (rows = features, columns = the BLOCK_B state
columns followed by the BLOCK_B columns of each of the m tangents), small enough to stay in L2;
``tl.debug_barrier`` orders one layer's stores before the next layer's loads inside the program.

Layer l computes ``pre = scale * (W h) + shift``, ``h = act(pre)`` and, on the tangent columns,
``T = act'(pre) * scale * (W T)``; the last layer stops at ``pre`` (f) and computes the tangent
products only where the trace reads them (row i of tangent i for the exact trace, every row for
Hutchinson). W is a dense (N, K) matrix or CSR (values, crow, col); the per-layer arguments arrive
as tuples, one entry per layer, and which layer is CSR or has a scale/shift is a compile-time bit
mask, so a field's structure compiles once. Products for the backward (``saved``) are written
exactly as the CPU op writes them (csrc/cpu/field_cpu.h). Samples whose state holds NaN/Inf get NaN
in f and in the trace, as on the CPU.

Activation codes follow ``FIELD_ACTIVATIONS`` (the order of sparseode.nn.fused_field's
FUSED_ACTIVATIONS and of FieldAct in csrc/cpu).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import activate, expm1, nonfinite

FIELD_ACTIVATIONS: tuple[str, ...] = ("identity", "tanh", "relu", "softplus", "sigmoid", "elu", "swish")


def field_activation_code(name: str) -> int:
    """Compile-time code of a field activation; a clear error for an unknown one."""
    try:
        return FIELD_ACTIVATIONS.index(name)
    except ValueError:
        raise ValueError(f"activation must be one of {', '.join(FIELD_ACTIVATIONS)}; got {name!r}") from None


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def act_and_slope(v, ACTIVATION: tl.constexpr):
    """(act(v), act'(v)) with the CPU kernel's formulas; NaN propagates."""
    if ACTIVATION == 0:
        y = v
        dy = tl.full(v.shape, 1.0, v.dtype)
    elif ACTIVATION == 1:
        y = activate(v, 1)
        dy = 1.0 - y * y
    elif ACTIVATION == 2:
        y = activate(v, 2)
        dy = tl.where(v > 0, 1.0, 0.0).to(v.dtype)
    elif ACTIVATION == 3:
        y = activate(v, 3)
        dy = tl.where(v > 20.0, 1.0, _sigmoid(tl.where(v > 20.0, 20.0, v)))
    elif ACTIVATION == 4:
        y = _sigmoid(v)
        dy = y * (1.0 - y)
    elif ACTIVATION == 5:
        em1 = expm1(tl.where(v > 0, 0.0, v))
        y = tl.where(v > 0, v, em1)
        dy = tl.where(v > 0, 1.0, em1 + 1.0)
    else:  # swish: v * sigmoid(v)
        s = _sigmoid(v)
        y = v * s
        dy = s + y * (1.0 - s)
    return y, dy


@triton.jit
def _product(w_ptr, crow_ptr, col_ptr, IS_CSR: tl.constexpr, rows, r_ok, K, x_ptr, P, col0,
             DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    """(W x)[rows, col0 : col0 + BLOCK_B] as a (BLOCK_N, BLOCK_B) ACC tile; x is a panel with row
    stride P (its columns past the batch are zero padding, so no column mask is needed)."""
    offs_j = col0 + tl.arange(0, BLOCK_B)
    acc = tl.zeros((rows.shape[0], BLOCK_B), dtype=ACC)
    rows64 = rows.to(tl.int64)
    if IS_CSR:
        start = tl.load(crow_ptr + rows64, mask=r_ok, other=0)
        end = tl.load(crow_ptr + rows64 + 1, mask=r_ok, other=0)
        for t in range(0, tl.max(end - start), BLOCK_NNZ):
            idx = start[:, None] + t + tl.arange(0, BLOCK_NNZ)[None, :]
            ok = idx < end[:, None]
            v = tl.load(w_ptr + idx, mask=ok, other=0.0).to(ACC)
            c = tl.load(col_ptr + idx, mask=ok, other=0).to(tl.int64)
            xg = tl.load(x_ptr + c[:, :, None] * P + offs_j[None, None, :], mask=ok[:, :, None], other=0.0)
            acc += tl.sum(v[:, :, None] * xg.to(ACC), axis=1)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            wt = tl.load(w_ptr + rows64[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                         other=0.0).to(ACC)
            xt = tl.load(x_ptr + offs_k.to(tl.int64)[:, None] * P + offs_j[None, :], mask=k_ok[:, None],
                         other=0.0).to(ACC)
            if DOT:
                acc = tl.dot(wt, xt, acc, input_precision=PRECISION)
            else:
                acc += tl.sum(wt[:, :, None] * xt[None, :, :], axis=1)
    return acc


@triton.jit
def _row_vector(ptr, HAS: tl.constexpr, rows, r_ok, fill):
    if HAS:
        return tl.load(ptr + rows, mask=r_ok, other=fill)
    return tl.full(rows.shape, fill, tl.float32)


@triton.jit
def _pack_input(z_ptr, probe_ptr, x_ptr, P, B, d, b0, m, TRACE: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [0, d) of the panel x: the states, then the tangents (unit vectors or the probe);
    columns past the batch are zeros."""
    offs_b = b0 + tl.arange(0, BLOCK_B)
    offs_j = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    for i0 in range(0, d, BLOCK_K):
        offs_i = i0 + tl.arange(0, BLOCK_K)
        i_ok = offs_i < d
        src = offs_b.to(tl.int64)[None, :] * d + offs_i[:, None]
        dst = x_ptr + offs_i.to(tl.int64)[:, None] * P + offs_j[None, :]
        ok = i_ok[:, None] & b_ok[None, :]
        zt = tl.load(z_ptr + src, mask=ok, other=0.0)
        tl.store(dst, zt.to(x_ptr.dtype.element_ty), mask=i_ok[:, None])
        if TRACE == 1:
            for q in range(0, m):
                one = tl.where((offs_i[:, None] == q) & b_ok[None, :], 1.0, 0.0)
                tl.store(dst + (1 + q) * BLOCK_B, one.to(x_ptr.dtype.element_ty), mask=i_ok[:, None])
        elif TRACE == 2:
            et = tl.load(probe_ptr + src, mask=ok, other=0.0)
            tl.store(dst + BLOCK_B, et.to(x_ptr.dtype.element_ty), mask=i_ok[:, None])


@triton.jit
def _hidden_layer(w_ptr, crow_ptr, col_ptr, scale_ptr, shift_ptr, saved_ptr, N, K,
                  IS_CSR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SAVE: tl.constexpr,
                  x_ptr, y_ptr, P, B, b0, m, ACTIVATION: tl.constexpr, DOT: tl.constexpr,
                  PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    """One hidden layer from panel x (K rows) to panel y (N rows); saved (N, 1 + m, B)."""
    offs_j = tl.arange(0, BLOCK_B)
    offs_b = b0 + offs_j
    b_ok = offs_b < B
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        r_ok = rows < N
        s = _row_vector(scale_ptr, HAS_SCALE, rows, r_ok, 1.0).to(ACC)
        c = _row_vector(shift_ptr, HAS_SHIFT, rows, r_ok, 0.0).to(ACC)
        slope = tl.zeros((BLOCK_N, BLOCK_B), dtype=ACC)
        for q in range(0, 1 + m):
            u = _product(w_ptr, crow_ptr, col_ptr, IS_CSR, rows, r_ok, K, x_ptr, P, q * BLOCK_B, DOT, PRECISION,
                         ACC, BLOCK_B, BLOCK_K, BLOCK_NNZ)
            if SAVE:
                sp = saved_ptr + (rows.to(tl.int64)[:, None] * (1 + m) + q) * B + offs_b[None, :]
                tl.store(sp, u.to(saved_ptr.dtype.element_ty), mask=r_ok[:, None] & b_ok[None, :])
            if q == 0:
                h, dh = act_and_slope(s[:, None] * u + c[:, None], ACTIVATION)
                slope = dh * s[:, None]
                out = h
            else:
                out = u * slope
            yp = y_ptr + rows.to(tl.int64)[:, None] * P + q * BLOCK_B + offs_j[None, :]
            tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _last_layer(w_ptr, crow_ptr, col_ptr, scale_ptr, shift_ptr, saved_ptr, K,
                IS_CSR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SAVE: tl.constexpr,
                x_ptr, P, probe_ptr, f_ptr, B, d, b0, TRACE: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    """f rows of the tile and its trace term (BLOCK_B,); saved (d, 1 + (TRACE > 0), B)."""
    groups = 1 + (TRACE > 0)
    offs_b = b0 + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    term = tl.zeros((BLOCK_B,), dtype=ACC)
    for n0 in range(0, d, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        r_ok = rows < d
        ok = r_ok[:, None] & b_ok[None, :]
        s = _row_vector(scale_ptr, HAS_SCALE, rows, r_ok, 1.0).to(ACC)
        c = _row_vector(shift_ptr, HAS_SHIFT, rows, r_ok, 0.0).to(ACC)
        sp = saved_ptr + rows.to(tl.int64)[:, None] * groups * B + offs_b[None, :]
        u = _product(w_ptr, crow_ptr, col_ptr, IS_CSR, rows, r_ok, K, x_ptr, P, 0, DOT, PRECISION, ACC,
                     BLOCK_B, BLOCK_K, BLOCK_NNZ)
        fp = f_ptr + offs_b.to(tl.int64)[None, :] * d + rows[:, None]
        tl.store(fp, (s[:, None] * u + c[:, None]).to(f_ptr.dtype.element_ty), mask=ok)
        if SAVE:
            tl.store(sp, u.to(saved_ptr.dtype.element_ty), mask=ok)
        if TRACE == 1:  # row i of tangent i, for the rows i of this chunk
            r = tl.zeros((BLOCK_N, BLOCK_B), dtype=ACC)
            for i in range(n0, tl.minimum(n0 + BLOCK_N, d)):
                v = _product(w_ptr, crow_ptr, col_ptr, IS_CSR, rows, rows == i, K, x_ptr, P, (1 + i) * BLOCK_B,
                             DOT, PRECISION, ACC, BLOCK_B, BLOCK_K, BLOCK_NNZ)
                r = tl.where((rows == i)[:, None], v, r)
            term += tl.sum(s[:, None] * r, axis=0)
            if SAVE:
                tl.store(sp + B, r.to(saved_ptr.dtype.element_ty), mask=ok)
        elif TRACE == 2:
            v = _product(w_ptr, crow_ptr, col_ptr, IS_CSR, rows, r_ok, K, x_ptr, P, BLOCK_B, DOT, PRECISION, ACC,
                         BLOCK_B, BLOCK_K, BLOCK_NNZ)
            e = tl.load(probe_ptr + offs_b.to(tl.int64)[None, :] * d + rows[:, None], mask=ok, other=0.0).to(ACC)
            term += tl.sum(e * s[:, None] * v, axis=0)
            if SAVE:
                tl.store(sp + B, v.to(saved_ptr.dtype.element_ty), mask=ok)
    return term


@triton.jit
def _poison(z_ptr, f_ptr, term, B, d, b0, BLOCK_B: tl.constexpr, D_PAD: tl.constexpr):
    """NaN in f and the trace term for the samples whose state holds NaN or Inf."""
    offs_b = b0 + tl.arange(0, BLOCK_B)
    offs_i = tl.arange(0, D_PAD)
    ok = (offs_b < B)[:, None] & (offs_i < d)[None, :]
    ptrs = offs_b.to(tl.int64)[:, None] * d + offs_i[None, :]
    zt = tl.load(z_ptr + ptrs, mask=ok, other=0.0)
    bad = tl.max(nonfinite(zt).to(tl.int32), axis=1) > 0
    tl.store(f_ptr + ptrs, tl.full((BLOCK_B, D_PAD), float("nan"), f_ptr.dtype.element_ty), mask=ok & bad[:, None])
    return tl.where(bad, float("nan"), term)


@triton.jit
def mlp_field_kernel(
    z_ptr, probe_ptr, f_ptr, tr_ptr, scratch_ptr,
    w, crow, col, scale, shift, saved, Ns, Ks,
    B, d, m, WIDTH, n_tiles,
    L: tl.constexpr, CSR: tl.constexpr, SCALES: tl.constexpr, SHIFTS: tl.constexpr, SAVE: tl.constexpr,
    TRACE: tl.constexpr, ACTIVATION: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    """f (B, d) and the trace term (B,) of an L-layer field at z (B, d); see the module docstring.

    w, crow, col, scale, shift, saved, Ns, Ks: tuples of L entries (unused entries any tensor);
    bit l of CSR / SCALES / SHIFTS says layer l is CSR / has a scale / has a shift. scratch holds
    2 * WIDTH * (1 + m) * BLOCK_B values per program (WIDTH: the widest layer, d included).
    """
    P = (1 + m) * BLOCK_B
    pid = tl.program_id(0)
    panel_a = scratch_ptr + pid.to(tl.int64) * 2 * WIDTH * P
    panel_b = panel_a + WIDTH * P
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        b0 = tile * BLOCK_B
        tl.debug_barrier()  # the previous tile's last reads of the panels are done
        _pack_input(z_ptr, probe_ptr, panel_a, P, B, d, b0, m, TRACE, BLOCK_B, BLOCK_K)
        x_ptr = panel_a
        y_ptr = panel_b
        for l in tl.static_range(L - 1):
            tl.debug_barrier()
            _hidden_layer(w[l], crow[l], col[l], scale[l], shift[l], saved[l], Ns[l], Ks[l],
                          (CSR >> l) & 1, (SCALES >> l) & 1, (SHIFTS >> l) & 1, SAVE, x_ptr, y_ptr, P, B, b0, m,
                          ACTIVATION, DOT, PRECISION, ACC, BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_NNZ)
            x_ptr, y_ptr = y_ptr, x_ptr
        tl.debug_barrier()
        term = _last_layer(w[L - 1], crow[L - 1], col[L - 1], scale[L - 1], shift[L - 1], saved[L - 1], Ks[L - 1],
                           (CSR >> (L - 1)) & 1, (SCALES >> (L - 1)) & 1, (SHIFTS >> (L - 1)) & 1, SAVE, x_ptr, P,
                           probe_ptr, f_ptr, B, d, b0, TRACE, DOT, PRECISION, ACC, BLOCK_B, BLOCK_N, BLOCK_K,
                           BLOCK_NNZ)
        term = _poison(z_ptr, f_ptr, term, B, d, b0, BLOCK_B, D_PAD)
        offs_b = b0 + tl.arange(0, BLOCK_B)
        tl.store(tr_ptr + offs_b, term.to(tr_ptr.dtype.element_ty), mask=offs_b < B)


# --- the backward's two sparse products on feature-major panels (csrc/cpu/field_backward_cpu.cpp) --
@triton.jit
def spmm_t_fm_kernel(a_ptr, vt_ptr, crow_t_ptr, col_t_ptr, out_ptr, K, P, ACC: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_NNZ: tl.constexpr, BLOCK_P: tl.constexpr):
    """out (K, P) = W^T a for a (N, P): row k of out gathers a's rows col_t[q] for the entries q of
    row k of W^T (values_t, crow_t, col_t)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < K
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    start = tl.load(crow_t_ptr + rows, mask=r_ok, other=0)
    end = tl.load(crow_t_ptr + rows + 1, mask=r_ok, other=0)
    acc = tl.zeros((ROWS, BLOCK_P), dtype=ACC)
    for t in range(0, tl.max(end - start), BLOCK_NNZ):
        idx = start[:, None] + t + tl.arange(0, BLOCK_NNZ)[None, :]
        ok = idx < end[:, None]
        v = tl.load(vt_ptr + idx, mask=ok, other=0.0).to(ACC)
        c = tl.load(col_t_ptr + idx, mask=ok, other=0).to(tl.int64)
        ag = tl.load(a_ptr + c[:, :, None] * P + offs_p[None, None, :], mask=ok[:, :, None] & p_ok[None, None, :],
                     other=0.0).to(ACC)
        acc += tl.sum(v[:, :, None] * ag, axis=1)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * P + offs_p[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & p_ok[None, :])


@triton.jit
def sddmm_fm_kernel(a_ptr, c_ptr, rows_ptr, col_ptr, out_ptr, nnz, P, ACC: tl.constexpr,
                    BLOCK_NNZ: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[e] = sum_p a[rows[e], p] * c[col[e], p] for a (N, P), c (K, P)."""
    idx = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    ok = idx < nnz
    r = tl.load(rows_ptr + idx, mask=ok, other=0).to(tl.int64)
    k = tl.load(col_ptr + idx, mask=ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_NNZ,), dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mk = ok[:, None] & (offs_p < P)[None, :]
        av = tl.load(a_ptr + r[:, None] * P + offs_p[None, :], mask=mk, other=0.0).to(ACC)
        cv = tl.load(c_ptr + k[:, None] * P + offs_p[None, :], mask=mk, other=0.0).to(ACC)
        acc += tl.sum(av * cv, axis=1)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)
