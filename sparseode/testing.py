"""Test axes in one place: tests parametrize over these and skip, with the reason, what the machine
lacks. Also builds the random cases the kernel tests share."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseode.ops import dispatch
from sparseode.ops.handlers import FORMATS

DTYPES = (torch.float32, torch.float64)
# Absolute/relative tolerance of a kernel against the float64 reference, by dtype.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10),
              torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


@dataclass(frozen=True)
class Shape:
    """One test case: input leading shape, weight (out, in), density, BSR block, and how the mask
    is made ("random", "empty_rows", "empty_cols")."""

    lead: tuple[int, ...]
    out: int
    inp: int
    density: float
    block: tuple[int, int] = (1, 1)
    kind: str = "random"

    @property
    def id(self) -> str:
        lead = "x".join(map(str, self.lead))
        return f"{lead}-{self.out}x{self.inp}-d{self.density}-b{self.block[0]}x{self.block[1]}-{self.kind}"


SHAPES = (
    Shape((5,), 1, 1, 1.0),
    Shape((4,), 3, 1000, 0.3, (1, 8)),
    Shape((33,), 257, 63, 0.2, (1, 7)),
    Shape((17,), 48, 40, 0.25, (8, 8), "empty_rows"),
    Shape((9,), 32, 48, 0.3, (16, 16), "empty_cols"),
    Shape((6,), 24, 20, 0.0, (4, 4)),
    Shape((6,), 24, 20, 1.0, (4, 5)),
    Shape((1,), 64, 32, 0.1, (16, 8)),
    Shape((2, 3, 7), 16, 12, 0.4, (4, 4)),
)


def backend_skip_reason(backend: str, device: str = "cpu") -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None when it can."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    st = dispatch.status(backend)
    if not st.available:
        return f"backend {backend!r} unavailable: {st.reason}"
    if device not in dispatch.get(backend).device_types:
        return f"backend {backend!r} does not run on {device}"
    return None


def make_mask(shape: Shape, generator: torch.Generator | None = None) -> Tensor:
    """A boolean (out, in) mask of about ``shape.density``, built block-wise for ``shape.block``."""
    bh, bw = shape.block
    grid = (shape.out // bh, shape.inp // bw)
    blocks = torch.rand(grid, generator=generator) < shape.density
    mask = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    # thin some kept blocks to exercise partly kept BSR blocks
    if shape.density not in (0.0, 1.0):
        mask &= torch.rand(mask.shape, generator=generator) < 0.8
    if shape.kind == "empty_rows":
        mask[: max(1, shape.out // 4)] = False
    elif shape.kind == "empty_cols":
        mask[:, : max(1, shape.inp // 4)] = False
    return mask


def make_case(shape: Shape, dtype: torch.dtype = torch.float32, device: str = "cpu",
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x (*lead, in), weight (out, in), mask (out, in) bool, bias (out,)) on fresh random values."""
    x = torch.randn(*shape.lead, shape.inp, generator=generator, dtype=torch.float64)
    w = torch.randn(shape.out, shape.inp, generator=generator, dtype=torch.float64)
    b = torch.randn(shape.out, generator=generator, dtype=torch.float64)
    mask = make_mask(shape, generator)
    return x.to(device, dtype), w.to(device, dtype), mask.to(device), b.to(device, dtype)


def opcheck_cases(fmt: str, x: Tensor, values: Tensor, pattern: tuple, bias: Tensor | None,
                  g: Tensor) -> list[tuple]:
    """(op, args) for ``torch.library.opcheck`` of every primitive of format ``fmt``: x (B, in),
    g (B, out); spmm_fm takes x^T with the activation on the first half of its columns."""
    from sparseode.ops.library import op

    xT = x.detach().t().contiguous().requires_grad_(x.requires_grad)
    return [
        (op(fmt, "spmm"), (x, values, *pattern, bias, "tanh")),
        (op(fmt, "spmm_fm"), (xT, values, *pattern, bias, "tanh", x.shape[0] // 2)),
        (op(fmt, "spmm_t"), (g, values, *pattern)),
        (op(fmt, "sddmm"), (g, x, *pattern)),
    ]
