"""How the pattern tensors of each format are laid out in the ``pattern`` list the ops take, and
the shapes that follow from them (shared by formats.py, reference.py and the fake kernels)."""
from __future__ import annotations

from torch import Tensor

PATTERN_FIELDS: dict[str, tuple[str, ...]] = {
    "masked": ("mask",),
    "csr": ("crow", "col", "crow_t", "col_t", "perm"),
    "bsr": ("crow", "col", "crow_t", "col_t", "perm", "block_mask"),
}
FORMATS: tuple[str, ...] = tuple(PATTERN_FIELDS)


def check_format(fmt: str) -> None:
    if fmt not in PATTERN_FIELDS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def block_of(fmt: str, pattern: list[Tensor]) -> tuple[int, int]:
    """Block size (bh, bw) of a pattern: (1, 1) for csr and masked."""
    if fmt == "bsr":
        return int(pattern[5].shape[1]), int(pattern[5].shape[2])
    return 1, 1


def out_features(fmt: str, pattern: list[Tensor]) -> int:
    if fmt == "masked":
        return int(pattern[0].shape[0])
    return (int(pattern[0].shape[0]) - 1) * block_of(fmt, pattern)[0]


def in_features(fmt: str, pattern: list[Tensor]) -> int:
    if fmt == "masked":
        return int(pattern[0].shape[1])
    return (int(pattern[2].shape[0]) - 1) * block_of(fmt, pattern)[1]


def values_shape(fmt: str, pattern: list[Tensor]) -> tuple[int, ...]:
    """Shape of ``values`` for this pattern (also the shape sddmm returns)."""
    if fmt == "masked":
        return tuple(pattern[0].shape)
    if fmt == "csr":
        return (int(pattern[1].shape[0]),)
    return tuple(pattern[5].shape)
