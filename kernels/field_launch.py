"""Python entry points of the fused-field Triton kernels (field.py), with the arguments and results
of the ``sparseode::mlp_field`` op (schema in csrc/ops.cpp, contract in csrc/cpu/field_cpu.h) and of
its backward's two products ``field_spmm_t_fm`` / ``field_sddmm_fm``.

On CUDA tensors these are the ops' CUDA kernels (field_register.py registers them); under
``TRITON_INTERPRET=1`` they also take CPU tensors, which is how CI tests them. float32 and float64,
accumulating in the input's dtype (tf32 in the dense layers only when
``torch.backends.cuda.matmul.allow_tf32`` is set). Launch configurations are fixed, not tuned (see
``field_config``): the first GPU run measures them (bench/gpu_field.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .field import field_activation_code, mlp_field_kernel, sddmm_fm_kernel, spmm_t_fm_kernel
from .grid import check_grid
from .tuning import interpreting

_CSR_FIELDS = 5  # crow, col, crow_t, col_t, perm
# Scratch the persistent grid may use for its ping-pong panels, in bytes: the grid shrinks (each
# program then takes more tiles) rather than pass it.
_SCRATCH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FieldConfig:
    block_b: int
    block_n: int
    block_k: int
    block_nnz: int
    num_warps: int
    programs_per_sm: int


def field_config(dtype: torch.dtype) -> FieldConfig:
    """The launch configuration: in the interpreter few, large programs (each program is a Python
    loop); on a GPU 32-sample tiles, 32-row chunks, several programs per SM to hide latency."""
    if interpreting():
        return FieldConfig(16, 32, 32, 16, 4, 1)
    if dtype == torch.float64:  # no tl.dot: the (rows, k, batch) product tile must stay small
        return FieldConfig(16, 16, 16, 8, 4, 4)
    return FieldConfig(32, 32, 32, 8, 4, 4)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(z: Tensor, n_tiles: int, per_program_bytes: int, cfg: FieldConfig) -> int:
    if z.is_cuda and not interpreting():
        index = z.device.index if z.device.index is not None else torch.cuda.current_device()
        wanted = cfg.programs_per_sm * _sm_count(index)
    else:
        wanted = 2  # the interpreter: two programs, so the persistent loop is exercised
    budget = max(1, _SCRATCH_BYTES // max(per_program_bytes, 1))
    return max(1, min(n_tiles, wanted, budget))


def _check(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"mlp_field: {name} {message}")


def _layer_dims(z: Tensor, weights: list[Tensor], patterns: list[Tensor], scales: list, shifts: list
                ) -> list[tuple[int, int, list[Tensor] | None]]:
    """(N, K, CSR pattern or None) per layer, checking that the layers chain from d back to d."""
    _check("weights", len(weights) >= 1, "must hold at least one layer")
    _check("scales/shifts", len(scales) == len(weights) == len(shifts),
           f"must hold one entry per layer ({len(weights)}), got {len(scales)} and {len(shifts)}")
    dims, k, p = [], z.shape[1], 0
    for i, w in enumerate(weights):
        _check(f"weights[{i}]", w.dtype == z.dtype and w.device == z.device,
               f"must match z's dtype and device ({z.dtype}, {z.device}), got {w.dtype} on {w.device}")
        if w.dim() == 2:
            _check(f"weights[{i}]", w.shape[1] == k, f"has {w.shape[1]} input features, expected {k}")
            dims.append((w.shape[0], k, None))
        else:
            _check(f"weights[{i}]", w.dim() == 1, f"must be dense (N, K) or CSR values (nnz,), got {tuple(w.shape)}")
            _check("patterns", p + _CSR_FIELDS <= len(patterns), f"must hold 5 tensors per CSR layer; layer {i} has none")
            pattern = patterns[p:p + _CSR_FIELDS]
            for t in pattern:
                _check(f"patterns (layer {i})", t.dtype == torch.int64 and t.dim() == 1 and t.device == z.device,
                       f"must be 1-D int64 tensors on {z.device}")
            crow, col, crow_t = pattern[0], pattern[1], pattern[2]
            _check(f"patterns (layer {i})", crow.numel() >= 1 and col.numel() == w.numel(),
                   f"crow/col do not match {w.numel()} stored values")
            _check(f"patterns (layer {i})", crow_t.numel() - 1 == k,
                   f"has {crow_t.numel() - 1} input features, expected {k}")
            dims.append((crow.numel() - 1, k, pattern))
            p += _CSR_FIELDS
        n = dims[-1][0]
        for what, v in (("scales", scales[i]), ("shifts", shifts[i])):
            if v is not None:
                _check(f"{what}[{i}]", v.dtype == z.dtype and v.shape == (n,) and v.device == z.device,
                       f"must be ({n},) {z.dtype} on {z.device}, got {tuple(v.shape)} {v.dtype} on {v.device}")
        k = n
    _check("weights", k == z.shape[1], f"the last layer has {k} outputs, expected the state size {z.shape[1]}")
    _check("patterns", p == len(patterns), f"holds {len(patterns)} tensors, the CSR layers use {p}")
    return dims


def _bits(flags: list[bool]) -> int:
    return sum(1 << i for i, on in enumerate(flags) if on)


def _precision(z: Tensor) -> str:
    tf32 = z.is_cuda and not interpreting() and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if z.dtype == torch.float32 and tf32 else "ieee"


def mlp_field(z: Tensor, probe: Tensor | None, weights: list[Tensor], patterns: list[Tensor],
              scales: list[Tensor | None], shifts: list[Tensor | None], activation: str, trace: int,
              save: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(f (B, d), trace term (B,), saved products) of the fused field; arguments as the op's."""
    _check("z", z.dim() == 2 and z.shape[1] >= 1, f"must be (B, d) with d >= 1, got {tuple(z.shape)}")
    _check("z", z.dtype in (torch.float32, torch.float64), f"must be float32 or float64, got {z.dtype}")
    _check("trace", trace in (0, 1, 2), f"must be 0 (none), 1 (exact) or 2 (Hutchinson), got {trace}")
    code = field_activation_code(activation)
    B, d = z.shape
    if trace == 2:
        _check("probe", probe is not None and probe.shape == z.shape and probe.dtype == z.dtype,
               f"must be given with z's shape {tuple(z.shape)} and dtype for the Hutchinson trace")
    dims = _layer_dims(z, weights, patterns, scales, shifts)
    m = d if trace == 1 else (1 if trace == 2 else 0)
    L = len(weights)
    f = z.new_empty((B, d))
    term = z.new_zeros((B,))
    saved = [z.new_empty((n, 1 + m if i + 1 < L else 1 + (trace > 0), B)) for i, (n, _, _) in enumerate(dims)] \
        if save else []
    if B == 0:
        return f, term, saved
    cfg = field_config(z.dtype)
    width = max([d] + [n for n, _, _ in dims])
    n_tiles = triton.cdiv(B, cfg.block_b)
    per_program = 2 * width * (1 + m) * cfg.block_b
    programs = _programs(z, n_tiles, per_program * z.element_size(), cfg)
    scratch = z.new_empty((programs * per_program,))
    zc = z.contiguous()
    pc = probe.contiguous() if trace == 2 else zc
    dummy = zc
    ws = tuple(w.contiguous() for w in weights)
    crows = tuple(p[0] if p is not None else dummy for _, _, p in dims)
    cols = tuple(p[1] if p is not None else dummy for _, _, p in dims)
    sc = tuple(s.contiguous() if s is not None else dummy for s in scales)
    sh = tuple(c.contiguous() if c is not None else dummy for c in shifts)
    sv = tuple(saved) if save else tuple(dummy for _ in dims)
    grid = check_grid("mlp_field", (programs,))
    with _on_device(z):
        mlp_field_kernel[grid](
            zc, pc, f, term, scratch, ws, crows, cols, sc, sh, sv,
            tuple(n for n, _, _ in dims), tuple(k for _, k, _ in dims),
            B, d, m, width, n_tiles,
            L=L, CSR=_bits([p is not None for _, _, p in dims]), SCALES=_bits([s is not None for s in scales]),
            SHIFTS=_bits([c is not None for c in shifts]), SAVE=save, TRACE=trace, ACTIVATION=code,
            DOT=z.dtype != torch.float64, PRECISION=_precision(z), ACC=_acc(z.dtype),
            D_PAD=triton.next_power_of_2(d), BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_NNZ=cfg.block_nnz, num_warps=cfg.num_warps,
        )
    return f, term, saved


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


class _on_device:
    """Launch on t's device (Triton launches on the current device and stream)."""

    def __init__(self, t: Tensor) -> None:
        self.guard = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self) -> None:
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.guard is not None:
            self.guard.__exit__(*exc)


def field_spmm_t_fm(a: Tensor, values_t: Tensor, crow_t: Tensor, col_t: Tensor) -> Tensor:
    """W^T a on a feature-major panel: a (N, P), W^T given by (values_t, crow_t, col_t) -> (K, P)."""
    _check("a", a.dim() == 2 and a.dtype == values_t.dtype, f"must be a 2-D panel of values_t's dtype, got "
           f"{tuple(a.shape)} {a.dtype}")
    K, P = crow_t.numel() - 1, a.shape[1]
    out = a.new_empty((K, P))
    if K == 0 or P == 0:
        return out
    rows, block_nnz, block_p = (32, 16, 64) if interpreting() else (8, 8, 128)
    grid = check_grid("field_spmm_t_fm", (triton.cdiv(K, rows), triton.cdiv(P, block_p)))
    with _on_device(a):
        spmm_t_fm_kernel[grid](a.contiguous(), values_t.contiguous(), crow_t, col_t, out, K, P, ACC=_acc(a.dtype),
                               ROWS=rows, BLOCK_NNZ=block_nnz, BLOCK_P=block_p)
    return out


def field_sddmm_fm(a: Tensor, c: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """(a c^T) at the stored positions of (crow, col): a (N, P), c (K, P) -> (nnz,)."""
    _check("c", a.dim() == 2 and c.dim() == 2 and a.shape[1] == c.shape[1] and a.dtype == c.dtype,
           f"must be a panel with a's columns and dtype, got a {tuple(a.shape)} {a.dtype}, c {tuple(c.shape)} {c.dtype}")
    nnz, P = col.numel(), a.shape[1]
    out = a.new_empty((nnz,))
    if nnz == 0:
        return out
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts, output_size=nnz)
    block_nnz, block_p = (64, 64) if interpreting() else (32, 64)
    grid = check_grid("field_sddmm_fm", (triton.cdiv(nnz, block_nnz),))
    with _on_device(a):
        sddmm_fm_kernel[grid](a.contiguous(), c.contiguous(), rows, col, out, nnz, P, ACC=_acc(a.dtype),
                              BLOCK_NNZ=block_nnz, BLOCK_P=block_p)
    return out
