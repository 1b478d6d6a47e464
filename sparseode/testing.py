"""Test axes in one place: tests parametrize over these and skip, with the reason, what the machine
lacks. Also builds the random cases the kernel tests share: per-layer ops and the fused field op."""
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


#: How :func:`field_op_args` makes each layer's scale and shift: as MLPVectorField's time modes give
#: them ("none": neither; "concat": a shift, time folded into the bias; "concatsquash": both), or
#: "mixed": a shift on every other layer and None on the rest.
FIELD_TIME_MODES = ("none", "concat", "concatsquash", "mixed")


def field_op_args(d: int, widths: tuple[int, ...], densities: tuple[float, ...], batch: int, time: str,
                  trace: int, dtype: torch.dtype = torch.float32, seed: int = 0, empty_row: bool = False
                  ) -> tuple[Tensor, Tensor | None, list[Tensor], list[Tensor], list, list]:
    """Random arguments ``(z, probe, weights, patterns, scales, shifts)`` of the fused field op
    ``sparseode::mlp_field`` for a field ``d -> *widths -> d``.

    The first and last layers are dense ``(n, k)`` weights; each hidden-to-hidden layer is CSR of
    ``densities[i]`` (its values, and its 5 pattern tensors appended to ``patterns``), with row 0
    emptied when ``empty_row``. ``scales``/``shifts`` hold one ``(n,)`` tensor or None per layer as
    ``time`` (a name in :data:`FIELD_TIME_MODES`) says. ``z (batch, d)``; ``probe (batch, d)`` for
    ``trace == 2`` (Hutchinson), else None. Floating tensors in ``dtype``, drawn from ``seed``.
    """
    from sparseode.ops.formats import SparseWeight

    if time not in FIELD_TIME_MODES:
        raise ValueError(f"time must be one of {FIELD_TIME_MODES}, got {time!r}")
    g = torch.Generator().manual_seed(seed)
    sizes = (d, *widths, d)
    weights, patterns, scales, shifts = [], [], [], []
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = torch.randn(n, k, generator=g, dtype=dtype) / k ** 0.5
        if 0 < i < len(sizes) - 2:
            mask = torch.rand(n, k, generator=g) < densities[i - 1]
            if empty_row:
                mask[0] = False
            sw = SparseWeight.from_dense(w, mask, format="csr")
            weights.append(sw.values.detach().clone())
            patterns.extend(t.clone() for t in list(sw.pattern)[:5])
        else:
            weights.append(w)
        scaled = time == "concatsquash"
        shifted = time in ("concat", "concatsquash") or (time == "mixed" and i % 2 == 0)
        scales.append(torch.rand(n, generator=g, dtype=dtype) + 0.5 if scaled else None)
        shifts.append(torch.randn(n, generator=g, dtype=dtype) if shifted else None)
    z = torch.randn(batch, d, generator=g, dtype=dtype)
    probe = torch.randn(batch, d, generator=g, dtype=dtype) if trace == 2 else None
    return z, probe, weights, patterns, scales, shifts


def relative_error(got: Tensor, want: Tensor) -> float:
    """``max |got - want| / max |want|`` (the denominator floored at 1e-12), as a float."""
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
