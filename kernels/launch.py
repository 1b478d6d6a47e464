"""Python entry points of the Triton kernels: the three primitives for every format.

Shapes follow ``sparseode.ops.reference``: a weight W (N, K) held by ``values`` and a typed pattern
(``sparseode.ops.patterns``), x (B, K), g and a (B, N), c (B, K); one function per format and
primitive, named like the op it serves (``csr_spmm`` for ``sparseode::csr_spmm``). float32 (tf32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set), float16, bfloat16 and float64; accumulation in
float32 (float64 for float64). Nothing here synchronises with the device, so the launches can be
captured in a CUDA graph: index arrays derived from a pattern are cached per pattern tensor (when
not capturing) and otherwise rebuilt with sync-free tensor ops.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from sparseode.ops.patterns import BSRPattern, CSRPattern, MaskedPattern

from .epilogue import activation_code
from .nonfinite import poison_nonfinite_kernel
from .tuning import batch_splits, interpreting, launcher

# Tile of the occupancy map of the masked format: tiles whose mask is all False are skipped.
MASK_TILE = 32


# --- derived index arrays, cached per pattern tensor ----------------------------------------------
_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be modified later)
        return -1


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _derived(key: Tensor, name: str, build: Callable[[], Tensor]) -> Tensor:
    """``build()``, remembered per (key tensor, name) until ``key`` is modified in place.

    Nothing is stored while a CUDA graph is being captured: memory allocated then belongs to the
    graph's pool and is reused after capture.
    """
    entry = _DERIVED.get(key)
    hit = entry.get(name) if entry is not None else None
    if hit is not None and hit[0] == _version(key):
        return hit[1]
    value = build()
    if not _capturing(key):
        if entry is None:
            entry = _DERIVED[key] = {}
        entry[name] = (_version(key), value)
    return value


def _rows_of(crow: Tensor, nnz: int) -> Tensor:
    """Row (block row) of every stored entry, (nnz,) int64."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts, output_size=nnz)


def _row_order(crow: Tensor) -> Tensor:
    """Rows sorted by length, longest first, (N,) int64."""
    return torch.argsort(crow[1:] - crow[:-1], descending=True, stable=True)


def _occupancy(mask: Tensor) -> Tensor:
    """(ceil(N/T), ceil(K/T)) uint8: 1 where the T x T tile of ``mask`` (N, K) holds a kept entry."""
    n, k = mask.shape
    t = MASK_TILE
    nt, kt = triton.cdiv(n, t), triton.cdiv(k, t)
    padded = F.pad(mask.to(torch.uint8), (0, kt * t - k, 0, nt * t - n))
    return padded.view(nt, t, kt, t).amax(dim=(1, 3)).contiguous()


# --- how the block kernels walk a weight ---------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """The structure of W (or W^T) as the block kernels walk it (see block.py).

    ``n`` x ``k`` is the shape of the walked matrix, ``bh`` x ``bw`` its blocks; a block list
    (``crow``, ``col``, optional ``perm``) or an occupancy map ``occ`` (n_brows, n_bcols); entry
    (i, j) of block p at (r, c) is at ``p*s_p + r*s_r + c*s_c + i*s_i + j*s_j`` of the values.
    """

    n: int
    k: int
    bh: int
    bw: int
    crow: Tensor | None
    col: Tensor | None
    perm: Tensor | None
    occ: Tensor | None
    mask: Tensor | None
    strides: tuple[int, int, int, int, int]

    @property
    def is_list(self) -> bool:
        return self.occ is None

    @property
    def n_brows(self) -> int:
        return triton.cdiv(self.n, self.bh)

    @property
    def n_bcols(self) -> int:
        return triton.cdiv(self.k, self.bw)


def bsr_walk(pattern: BSRPattern, transposed: bool) -> Blocks:
    """The walk of a BSR W (N, K) for spmm, or of W^T (K, N) for spmm_t (``transposed``)."""
    bh, bw = int(pattern.block_mask.shape[1]), int(pattern.block_mask.shape[2])
    n, k = (pattern.crow.numel() - 1) * bh, (pattern.crow_t.numel() - 1) * bw
    if transposed:  # block q of W^T is values[perm[q]]^T
        return Blocks(k, n, bw, bh, pattern.crow_t, pattern.col_t, pattern.perm, None, None, (bh * bw, 0, 0, 1, bw))
    return Blocks(n, k, bh, bw, pattern.crow, pattern.col, None, None, None, (bh * bw, 0, 0, bw, 1))


def masked_walk(pattern: MaskedPattern, transposed: bool) -> Blocks:
    """The tiles of a masked W (N, K) (or of W^T), empty tiles skipped through an occupancy map."""
    mask = pattern.mask
    n, k = mask.shape
    t = MASK_TILE
    occ = _derived(mask, "occ", lambda: _occupancy(mask))
    m8 = mask.view(torch.uint8)
    if transposed:
        occ_t = _derived(mask, "occ_t", lambda: occ.t().contiguous())
        return Blocks(k, n, t, t, None, None, None, occ_t, m8, (0, t, t * k, 1, k))
    return Blocks(n, k, t, t, None, None, None, occ, m8, (0, t * k, t, k, 1))


# --- launch helpers ------------------------------------------------------------------------------
def _pad(size: int) -> int:
    """Padded block extent: a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(size))


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _upcast(t: Tensor) -> bool:
    """bfloat16 in the interpreter, whose bfloat16 ``tl.dot`` is wrong and whose float32 -> bfloat16
    cast truncates (triton 3.9): the block kernels then feed tl.dot float32 copies, and every kernel
    writes float32 that torch rounds to bfloat16 afterwards."""
    return t.dtype == torch.bfloat16 and interpreting()


def _store_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if _upcast(t) else t.dtype


def _precision(t: Tensor) -> str | None:
    """tl.dot input precision: tf32 only where the user opted in (torch's own switch)."""
    if _upcast(t):
        return "ieee"
    if t.dtype == torch.float32:
        tf32 = t.is_cuda and not interpreting() and torch.backends.cuda.matmul.allow_tf32
        return "tf32" if tf32 else "ieee"
    return "ieee" if t.dtype == torch.float64 else None


@contextlib.contextmanager
def _on_device(t: Tensor) -> Iterator[None]:
    """Launch on t's device (Triton launches on the current device and stream)."""
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def _poison(x: Tensor, walk: Blocks, y: Tensor) -> None:
    """NaN where the dense product would have met a NaN/Inf of x (B, K) with a structural zero."""
    B, bh, bw = x.shape[0], walk.bh, walk.bw
    BW = triton.next_power_of_2(bw)
    block_b = 16
    dummy = x
    wrap_triton(poison_nonfinite_kernel)[(triton.cdiv(B, block_b),)](
        x, walk.crow if walk.is_list else dummy, walk.col if walk.is_list else dummy,
        dummy if walk.is_list else walk.occ, y,
        B, walk.k, walk.n, bh, bw, walk.n_brows, walk.n_bcols,
        LIST=walk.is_list, BH=triton.next_power_of_2(bh), BW=BW, BLOCKS=max(1, 64 // BW), BLOCK_K=128,
        BLOCK_B=block_b,
    )


def _block_spmm(x: Tensor, values: Tensor, walk: Blocks, bias: Tensor | None, activation: str) -> Tensor:
    B = x.shape[0]
    y = x.new_empty((B, walk.n), dtype=_store_dtype(x))
    if B == 0 or walk.n == 0:
        return y.to(x.dtype)
    dummy = values
    BH, BW = _pad(walk.bh), _pad(walk.bw)
    launcher("block_spmm")(
        lambda meta: (walk.n_brows, triton.cdiv(B, meta["BLOCK_B"])),
        x_ptr=x, v_ptr=values, mask_ptr=walk.mask if walk.mask is not None else dummy,
        perm_ptr=walk.perm if walk.perm is not None else dummy,
        crow_ptr=walk.crow if walk.is_list else dummy, col_ptr=walk.col if walk.is_list else dummy,
        occ_ptr=dummy if walk.is_list else walk.occ, bias_ptr=bias if bias is not None else dummy, y_ptr=y,
        B=B, N=walk.n, K=walk.k, bh=walk.bh, bw=walk.bw, n_bcols=walk.n_bcols,
        s_p=walk.strides[0], s_r=walk.strides[1], s_c=walk.strides[2], s_i=walk.strides[3], s_j=walk.strides[4],
        LIST=walk.is_list, HAS_PERM=walk.perm is not None, HAS_MASK=walk.mask is not None,
        HAS_BIAS=bias is not None, ACTIVATION=activation_code(activation), PRECISION=_precision(x),
        ACC=_acc(x.dtype), UPCAST=_upcast(x), BH=BH, BW=BW,
    )
    _poison(x, walk, y)
    return y.to(x.dtype)


def _csr_spmm(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, perm: Tensor | None, K: int,
              bias: Tensor | None, activation: str) -> Tensor:
    B, N = x.shape[0], crow.numel() - 1
    y = x.new_empty((B, N), dtype=_store_dtype(x))
    if B == 0 or N == 0:
        return y.to(x.dtype)
    xT = x.t().contiguous()
    order = _derived(crow, "order", lambda: _row_order(crow))
    dummy = values
    launcher("csr_spmm")(
        lambda meta: (triton.cdiv(N, meta["ROWS"]), triton.cdiv(B, meta["BLOCK_B"])),
        xT_ptr=xT, v_ptr=values, perm_ptr=perm if perm is not None else dummy, crow_ptr=crow, col_ptr=col,
        order_ptr=order, bias_ptr=bias if bias is not None else dummy, y_ptr=y, B=B, N=N, K=K,
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, ACTIVATION=activation_code(activation),
        ACC=_acc(x.dtype),
    )
    walk = Blocks(N, K, 1, 1, crow, col, None, None, None, (1, 0, 0, 0, 0))
    _poison(x, walk, y)
    return y.to(x.dtype)


def _split_output(shape: tuple[int, ...], splits: int, like: Tensor, zero: bool) -> Tensor:
    """sddmm's output: ``shape`` in like's dtype, or (splits, *shape) partial sums in the
    accumulator's dtype when the batch is split."""
    dtype = _store_dtype(like) if splits == 1 else (torch.float64 if like.dtype == torch.float64 else torch.float32)
    full = shape if splits == 1 else (splits, *shape)
    return (torch.zeros if zero else torch.empty)(full, dtype=dtype, device=like.device)


def _finish_splits(out: Tensor, splits: int, dtype: torch.dtype) -> Tensor:
    return (out if splits == 1 else out.sum(0)).to(dtype)


# --- the primitives, one per format ---------------------------------------------------------------
def _inputs(*ts: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(t.contiguous() if t is not None else None for t in ts)


def csr_spmm(x: Tensor, values: Tensor, pattern: CSRPattern, bias: Tensor | None, activation: str) -> Tensor:
    """act(x W^T + bias): x (B, K) -> (B, N), in x's dtype."""
    x, values, bias = _inputs(x, values, bias)
    with _on_device(x):
        return _csr_spmm(x, values, pattern.crow, pattern.col, None, x.shape[1], bias, activation)


def csr_spmm_t(g: Tensor, values: Tensor, pattern: CSRPattern) -> Tensor:
    """g W: g (B, N) -> (B, K), through the transposed pattern (no copy of the values)."""
    g, values = _inputs(g, values)
    with _on_device(g):
        return _csr_spmm(g, values, pattern.crow_t, pattern.col_t, pattern.perm, g.shape[1], None, "identity")


def csr_sddmm(a: Tensor, c: Tensor, pattern: CSRPattern) -> Tensor:
    """(a^T c) at the stored positions: a (B, N), c (B, K) -> (nnz,)."""
    a, c = _inputs(a, c)
    with _on_device(a):
        return _csr_sddmm(a, c, pattern.crow, pattern.col)


def bsr_spmm(x: Tensor, values: Tensor, pattern: BSRPattern, bias: Tensor | None, activation: str) -> Tensor:
    """act(x W^T + bias) for a BSR W; entries that block_mask drops count as zero."""
    x, values, bias = _inputs(x, values * pattern.block_mask, bias)
    with _on_device(x):
        return _block_spmm(x, values, bsr_walk(pattern, transposed=False), bias, activation)


def bsr_spmm_t(g: Tensor, values: Tensor, pattern: BSRPattern) -> Tensor:
    g, values = _inputs(g, values * pattern.block_mask)
    with _on_device(g):
        return _block_spmm(g, values, bsr_walk(pattern, transposed=True), None, "identity")


def bsr_sddmm(a: Tensor, c: Tensor, pattern: BSRPattern) -> Tensor:
    """(a^T c) in the stored blocks, zero where block_mask drops an entry: (nnz_blocks, bh, bw)."""
    a, c = _inputs(a, c)
    with _on_device(a):
        out = _block_sddmm(a, c, bsr_walk(pattern, transposed=False), a.shape[1], c.shape[1])
    return out.masked_fill_(~pattern.block_mask, 0)


def masked_spmm(x: Tensor, values: Tensor, pattern: MaskedPattern, bias: Tensor | None, activation: str) -> Tensor:
    x, values, bias = _inputs(x, values, bias)
    with _on_device(x):
        return _block_spmm(x, values, masked_walk(pattern, transposed=False), bias, activation)


def masked_spmm_t(g: Tensor, values: Tensor, pattern: MaskedPattern) -> Tensor:
    g, values = _inputs(g, values)
    with _on_device(g):
        return _block_spmm(g, values, masked_walk(pattern, transposed=True), None, "identity")


def masked_sddmm(a: Tensor, c: Tensor, pattern: MaskedPattern) -> Tensor:
    """(a^T c) where the mask keeps an entry, zero elsewhere: (N, K)."""
    a, c = _inputs(a, c)
    with _on_device(a):
        out = _block_sddmm(a, c, masked_walk(pattern, transposed=False), a.shape[1], c.shape[1])
    return out.masked_fill_(~pattern.mask, 0)


def _csr_sddmm(a: Tensor, c: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    B, nnz = a.shape[0], col.numel()
    if nnz == 0:
        return a.new_empty((0,))
    rows = _derived(crow, "rows", lambda: _rows_of(crow, nnz))
    aT, cT = a.t().contiguous(), c.t().contiguous()
    splits = batch_splits(triton.cdiv(nnz, 64), B, a.device)
    out = _split_output((nnz,), splits, a, zero=False)
    launcher("csr_sddmm")(
        lambda meta: (triton.cdiv(nnz, meta["BLOCK_NNZ"]), splits),
        aT_ptr=aT, cT_ptr=cT, rows_ptr=rows, col_ptr=col, out_ptr=out, B=B, nnz=nnz,
        b_chunk=triton.cdiv(B, splits), s_split=nnz if splits > 1 else 0, ACC=_acc(a.dtype),
    )
    return _finish_splits(out, splits, a.dtype)


def _block_sddmm(a: Tensor, c: Tensor, walk: Blocks, N: int, K: int) -> Tensor:
    # The output is laid out like the values, so the walk's value addressing is the output's.
    B = a.shape[0]
    if walk.is_list:
        nnz = walk.col.numel()
        shape, n_items = (nnz, walk.bh, walk.bw), nnz
    else:
        shape, n_items = (N, K), walk.n_brows * walk.n_bcols
    if n_items == 0:
        return a.new_zeros(shape)
    rows = _derived(walk.crow, "rows", lambda: _rows_of(walk.crow, n_items)) if walk.is_list else a
    splits = batch_splits(n_items, B, a.device)
    # An occupancy walk leaves the entries of empty tiles alone: they must start at zero.
    out = _split_output(shape, splits, a, zero=not walk.is_list)
    s_p, s_r, s_c, s_i, s_j = walk.strides
    launcher("block_sddmm")(
        lambda meta: (n_items, splits),
        a_ptr=a, c_ptr=c, rows_ptr=rows, col_ptr=walk.col if walk.is_list else a,
        occ_ptr=a if walk.is_list else walk.occ, out_ptr=out,
        B=B, N=N, K=K, bh=walk.bh, bw=walk.bw, n_bcols=walk.n_bcols, b_chunk=triton.cdiv(max(B, 1), splits),
        s_split=math.prod(shape) if splits > 1 else 0, s_p=s_p, s_r=s_r, s_c=s_c, s_i=s_i, s_j=s_j,
        LIST=walk.is_list, PRECISION=_precision(a), ACC=_acc(a.dtype), UPCAST=_upcast(a), BH=_pad(walk.bh),
        BW=_pad(walk.bw),
    )
    return _finish_splits(out, splits, a.dtype)
