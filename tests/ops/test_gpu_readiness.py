"""GPU code paths that a CPU machine can still check: 64-bit index arithmetic in the Triton kernels
(run through the interpreter, which wraps 32-bit products as a GPU does) and the launch-grid limits
every Triton launch is checked against."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from sparseode.kernels import grid, tuning  # noqa: E402
from sparseode.kernels.block import block_offsets  # noqa: E402


@triton.jit
def _offsets_kernel(out_ptr, n_cols, s_p, s_r, s_c, s_u, s_v, U: tl.constexpr, V: tl.constexpr):
    # p, r and c are 32-bit here, as the masked walk's loop counter over block columns is
    r = tl.program_id(0)
    for c in range(0, n_cols):
        if c == n_cols - 1:
            off = block_offsets(r * 0, r, c, tl.arange(0, U), tl.arange(0, V), s_p, s_r, s_c, s_u, s_v)
            idx = tl.arange(0, U)[:, None] * V + tl.arange(0, V)[None, :]
            tl.store(out_ptr + idx, off)


def test_block_offsets_do_not_wrap_past_2_31() -> None:
    # The transposed masked walk: block column c of W^T (K, N) starts at c * 32 * N; with N = K = 2**17
    # (a 64 GB weight, so only the arithmetic is run) c * s_c is about 2**39.
    n = 2**17
    s_p, s_r, s_c, s_u, s_v = 0, 32, 32 * n, 1, n
    n_cols = n // 32
    out = torch.zeros(16, 16, dtype=torch.int64)
    _offsets_kernel[(1,)](out, n_cols, s_p, s_r, s_c, s_u, s_v, U=16, V=16)
    c = n_cols - 1
    want = torch.tensor([[c * s_c + u * s_u + v * s_v for v in range(16)] for u in range(16)], dtype=torch.int64)
    assert want.max() > 2**31
    assert torch.equal(out, want)


def test_grid_within_limits_is_unchanged() -> None:
    assert grid.check_grid("k", (2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    assert grid.check_grid("k", (7,)) == (7,)


@pytest.mark.parametrize("bad, dim", [((1, 65536), 1), ((1, 1, 70000), 2), ((2**31, 1), 0)])
def test_grid_past_a_limit_is_a_clear_error(bad: tuple[int, ...], dim: int) -> None:
    with pytest.raises(ValueError, match=rf"csr_spmm: launch grid .* along dimension {dim}, more than CUDA's limit"):
        grid.check_grid("csr_spmm", bad)


def test_every_launcher_checks_its_grid() -> None:
    # A real kernel with valid arguments: without the check the interpreter would run 70,000 programs.
    a = torch.randn(4, 3)
    c = torch.randn(4, 5)
    rows, col = torch.tensor([0, 2]), torch.tensor([1, 4])
    out = torch.zeros(2)
    with pytest.raises(ValueError, match="csr_sddmm: launch grid .* 70,000 programs along dimension 1"):
        tuning.launcher("csr_sddmm")(
            lambda meta: (1, 70000), aT_ptr=a.t().contiguous(), cT_ptr=c.t().contiguous(), rows_ptr=rows,
            col_ptr=col, out_ptr=out, B=4, nnz=2, b_chunk=4, s_split=0, ACC=tl.float32,
        )
    assert torch.equal(out, torch.zeros(2))
