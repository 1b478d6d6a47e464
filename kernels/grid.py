"""Launch-grid limits of CUDA, checked before every Triton launch (``tuning.Launcher``).

A grid may hold at most 2**31 - 1 programs along its first dimension and 65,535 along the second
and third. The kernels put output rows (or stored blocks) on the first dimension and batch tiles or
batch splits on the second, so a very large batch is what passes the limit; past it the launch
would fail on the GPU with an opaque error (or, on some drivers, silently skip work).
"""
from __future__ import annotations

from typing import Any, Callable

MAX_GRID = (2**31 - 1, 65535, 65535)

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


def check_grid(name: str, grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` unchanged when every dimension is within CUDA's limits; else a ValueError naming
    the kernel, the dimension and its size."""
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{name}: a launch grid has 1 to 3 dimensions, got {grid}")
    for dim, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if size > limit:
            raise ValueError(
                f"{name}: launch grid {tuple(grid)} has {size:,} programs along dimension {dim}, more than "
                f"CUDA's limit of {limit:,} (dimension 1 counts batch tiles: split the batch into smaller chunks)"
            )
    return grid


def checked(name: str, grid: Grid) -> Grid:
    """The grid function ``grid`` (of the launch's meta-parameters), checked by :func:`check_grid`."""
    return lambda meta: check_grid(name, tuple(grid(meta)))
