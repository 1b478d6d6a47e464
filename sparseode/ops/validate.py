"""Checks that a pattern is well formed before any kernel reads it (once, at construction and on
load): a corrupted pattern must give an exception naming the field and position, never an
out-of-bounds read or a wrong answer.
"""
from __future__ import annotations

import torch
from torch import Tensor


class PatternError(ValueError):
    """A sparsity pattern that is not well formed; the message names the field and position."""


def check_tensor(name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
                 dim: int | None = None) -> Tensor:
    """``t`` is a Tensor of ``dtype`` with ``shape`` (or ``dim`` dimensions)."""
    if not isinstance(t, Tensor):
        raise PatternError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise PatternError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise PatternError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dim is not None and t.dim() != dim:
        raise PatternError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _first(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def check_compressed(crow_name: str, col_name: str, crow: Tensor, col: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """A compressed-row index over an (n_rows, n_cols) grid: crow (n_rows + 1,) int64 from 0 to
    nnz, non-decreasing; col (nnz,) int64 in [0, n_cols), strictly increasing within each row.
    Returns the row of every entry (nnz,)."""
    check_tensor(crow_name, crow, torch.long, (n_rows + 1,))
    check_tensor(col_name, col, torch.long, dim=1)
    crow, col = crow.cpu(), col.cpu()
    if int(crow[0]) != 0:
        raise PatternError(f"{crow_name}[0] = {int(crow[0])}, expected 0")
    steps = crow[1:] - crow[:-1]
    if bool((steps < 0).any()):
        i = _first(steps < 0) + 1
        raise PatternError(f"{crow_name}[{i}] = {int(crow[i])} < {crow_name}[{i - 1}] = {int(crow[i - 1])}")
    nnz = col.numel()
    if int(crow[-1]) != nnz:
        raise PatternError(f"{crow_name}[{n_rows}] = {int(crow[-1])} but {col_name} holds {nnz} entries")
    out = (col < 0) | (col >= n_cols)
    if bool(out.any()):
        p = _first(out)
        raise PatternError(f"{col_name}[{p}] = {int(col[p])} is out of range [0, {n_cols})")
    rows = torch.repeat_interleave(torch.arange(n_rows), steps)
    same_row = rows[1:] == rows[:-1]
    unsorted = same_row & (col[1:] <= col[:-1])
    if bool(unsorted.any()):
        p = _first(unsorted) + 1
        raise PatternError(f"{col_name}[{p}] = {int(col[p])} does not follow {col_name}[{p - 1}] = "
                           f"{int(col[p - 1])} in row {int(rows[p])}: columns must be sorted and unique")
    return rows


def check_transposed(crow: Tensor, col: Tensor, crow_t: Tensor, col_t: Tensor, perm: Tensor,
                     n_rows: int, n_cols: int) -> None:
    """(crow_t, col_t) is the pattern of W^T and entry q of W^T is entry perm[q] of W."""
    rows = check_compressed("crow", "col", crow, col, n_rows, n_cols)
    rows_t = check_compressed("crow_t", "col_t", crow_t, col_t, n_cols, n_rows)
    nnz = col.numel()
    if col_t.numel() != nnz:
        raise PatternError(f"col_t holds {col_t.numel()} entries but col holds {nnz}")
    check_tensor("perm", perm, torch.long, (nnz,))
    perm = perm.cpu()
    out = (perm < 0) | (perm >= nnz)
    if bool(out.any()):
        q = _first(out)
        raise PatternError(f"perm[{q}] = {int(perm[q])} is out of range [0, {nnz})")
    if nnz and bool((torch.bincount(perm, minlength=nnz) != 1).any()):
        p = _first(torch.bincount(perm, minlength=nnz) != 1)
        raise PatternError(f"perm is not a permutation: entry {p} appears {int((perm == p).sum())} times")
    wrong = (rows[perm] != col_t.cpu()) | (col.cpu()[perm] != rows_t)
    if bool(wrong.any()):
        q = _first(wrong)
        raise PatternError(f"perm[{q}] = {int(perm[q])} points at entry ({int(rows[perm[q]])}, "
                           f"{int(col[perm[q]])}) of W, but entry {q} of W^T is ({int(rows_t[q])}, {int(col_t[q])})")


def check_values(values: object, shape: tuple[int, ...], device: torch.device) -> None:
    """values: a floating-point Tensor of ``shape`` on the pattern's device."""
    if not isinstance(values, Tensor):
        raise PatternError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise PatternError(f"values must be floating point, got dtype {values.dtype}")
    if tuple(values.shape) != tuple(shape):
        raise PatternError(f"values has shape {tuple(values.shape)}, the pattern needs {tuple(shape)}")
    if values.device != device:
        raise PatternError(f"values is on {values.device} but the pattern is on {device}")


def check_same_device(fields: dict[str, Tensor]) -> torch.device:
    """Every pattern tensor on one device; returns it."""
    devices = {name: t.device for name, t in fields.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise PatternError(f"pattern tensors must share a device: {name} is on {dev}, "
                               f"{next(iter(devices))} on {first}")
    return first
