"""The Triton backend against ``sparseode.ops.reference``, through the public ``SparseLinear``.

On a machine without a GPU this runs every kernel through Triton's interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1`` before triton is imported). The interpreter runs each program in Python,
so the shapes are small, chosen to cover what the kernels branch on: odd sizes, padded BSR blocks,
empty tiles and rows, several batch tiles, batch 1, 3-D input, the all-empty and full masks.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from sparseode.nn.sparse_linear import SparseLinear
from sparseode.ops import ACTIVATIONS, reference, sddmm, spmm_t, use_backend
from sparseode.testing import TOLERANCES, Shape, backend_skip_reason, make_case

pytestmark = [
    pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton"))),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="these run the kernels on CPU tensors through TRITON_INTERPRET=1; "
                              "tests/ops/test_cuda.py tests the compiled kernels"),
    # numpy, under the interpreter, warns on Inf/NaN arithmetic that the tests cause on purpose
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

# (format, shape): the block of the shape is the BSR block (and shapes the mask for the others).
A = Shape((33,), 64, 96, 0.5, (32, 32))  # whole 32x32 tiles empty: the masked kernel skips them
B = Shape((21,), 37, 53, 0.3, (1, 1), "empty_rows")  # odd sizes, empty rows
C = Shape((70,), 48, 80, 0.4, (16, 16), "empty_cols")  # two batch tiles, empty block columns
D = Shape((9,), 24, 40, 0.5, (8, 5))  # blocks below tl.dot's 16 and not powers of two: padded
CASES = [("masked", A), ("masked", B), ("csr", B), ("csr", C), ("bsr", A), ("bsr", C), ("bsr", D)]
FORMAT_SHAPES = {"masked": A, "csr": B, "bsr": C}
ATOL, RTOL = TOLERANCES[torch.float32]


def _layer(fmt: str, shape: Shape, activation: str = "identity", bias: bool = True,
           dtype: torch.dtype = torch.float32, mask: Tensor | None = None) -> tuple[SparseLinear, Tensor]:
    """A SparseLinear on the triton backend and a fresh input (*lead, in) for ``shape``."""
    x, w, shape_mask, b = make_case(shape, dtype)
    lin = nn.Linear(shape.inp, shape.out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(b)
    layer = SparseLinear.from_dense(lin, shape_mask if mask is None else mask, format=fmt, backend="triton",
                                    block=shape.block if fmt == "bsr" else (16, 16), activation=activation)
    return layer, x


def _check_against_reference(layer: SparseLinear, x: Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Forward, input, weight and bias gradients of ``layer`` against the float64 reference."""
    x = x.clone().requires_grad_()
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()

    sw = layer.sparse
    x64 = x.detach().double().requires_grad_()
    v64 = sw.values.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if layer.bias is not None else None
    y64 = reference.spmm(x64.reshape(-1, layer.in_features), v64, sw.pattern, b64, layer.activation)
    y64 = y64.reshape(y.shape)
    (y64 * gy.double()).sum().backward()

    torch.testing.assert_close(y.double(), y64, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(sw.values.grad.double(), v64.grad, atol=atol, rtol=rtol)
    if b64 is not None:
        torch.testing.assert_close(layer.bias.grad.double(), b64.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("fmt,shape", CASES, ids=[f"{f}-{s.id}" for f, s in CASES])
def test_forward_and_gradients_match_reference(fmt: str, shape: Shape) -> None:
    layer, x = _layer(fmt, shape, activation="tanh")
    _check_against_reference(layer, x)


@pytest.mark.parametrize("fmt", ("masked", "csr", "bsr"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_bias_and_activation_epilogue(fmt: str, activation: str) -> None:
    layer, x = _layer(fmt, FORMAT_SHAPES[fmt], activation=activation)
    x = 4 * x  # reach the saturating parts of tanh/sigmoid and both sides of relu/elu
    with torch.no_grad():
        y = layer(x)
        y64 = reference.spmm(x.double(), layer.sparse.values.double(), layer.sparse.pattern,
                             layer.bias.double(), activation)
    torch.testing.assert_close(y.double(), y64, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fmt", ("masked", "csr", "bsr"))
@pytest.mark.parametrize("case", ("empty", "full", "batch1", "3d", "no_bias"))
def test_edge_cases(fmt: str, case: str) -> None:
    base = FORMAT_SHAPES[fmt]
    lead = {"batch1": (1,), "3d": (2, 3)}.get(case, base.lead)
    density = {"empty": 0.0, "full": 1.0}.get(case, base.density)
    shape = Shape(lead, base.out, base.inp, density, base.block)
    layer, x = _layer(fmt, shape, activation="softplus", bias=case != "no_bias")
    if case == "empty":
        assert layer.sparse.nnz() == 0
    _check_against_reference(layer, x)


@pytest.mark.parametrize("fmt", ("masked", "csr", "bsr"))
def test_nonfinite_values_propagate_like_the_dense_product(fmt: str) -> None:
    layer, x = _layer(fmt, FORMAT_SHAPES[fmt])
    sw = layer.sparse
    x[1, 3] = float("inf")
    x[4, -1] = float("nan")
    x[6] = float("-inf")
    g = torch.randn(x.shape[0], layer.out_features)
    g[2, 0] = float("inf")
    g[5, -2] = float("nan")
    with torch.no_grad():
        with use_backend("triton", "cpu"):
            pairs = [(layer(x), reference.spmm(x, sw.values, sw.pattern, layer.bias)),
                     (spmm_t(g, sw.values, sw.pattern), reference.spmm_t(g, sw.values, sw.pattern))]
    for out, ref in pairs:
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.isinf(), ref.isinf())
        finite = ref.isfinite()
        assert finite.any()
        torch.testing.assert_close(out[finite], ref[finite], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fmt", ("masked", "csr", "bsr"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float64), ids=str)
def test_other_dtypes_forward(fmt: str, dtype: torch.dtype) -> None:
    """Half types: error against float64 at most twice plain PyTorch's at the same precision."""
    layer, x = _layer(fmt, FORMAT_SHAPES[fmt], activation="tanh", dtype=dtype)
    sw = layer.sparse
    with torch.no_grad():
        y = layer(x)
        y64 = reference.spmm(x.double(), sw.values.double(), sw.pattern, layer.bias.double(), "tanh")
        plain = reference.spmm(x, sw.values, sw.pattern, layer.bias, "tanh")
    assert y.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(y, y64, atol=1e-12, rtol=1e-12)
    else:
        err, err_torch = (y.double() - y64).abs().max(), (plain.double() - y64).abs().max()
        assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("fmt", ("masked", "csr", "bsr"))
def test_split_batch_sddmm(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU splits a long batch of a small weight's sddmm into partial sums; force it here."""
    from sparseode.kernels import launch

    monkeypatch.setattr(launch, "batch_splits", lambda n_items, B, device: 3)
    layer, x = _layer(fmt, FORMAT_SHAPES[fmt])
    sw = layer.sparse
    a = torch.randn(x.shape[0], layer.out_features)
    with use_backend("triton", "cpu"):
        out = sddmm(a, x, sw.pattern)
    torch.testing.assert_close(out, reference.sddmm(a, x, sw.pattern), atol=ATOL, rtol=RTOL)


def test_masked_occupancy_follows_in_place_mask_changes() -> None:
    """The tile map of a mask is cached; changing the mask in place must rebuild it."""
    layer, x = _layer("masked", A)
    mask = layer.sparse.get_buffer("mask")
    empty = ~mask.view(2, 32, 3, 32).any(3).any(1)
    assert empty.any(), "the case needs an empty tile"
    with torch.no_grad():
        before = layer(x)
        r, c = empty.nonzero()[0].tolist()
        mask[r * 32 + 5, c * 32 + 7] = True  # revive one weight in an empty tile
        layer.sparse.values[r * 32 + 5, c * 32 + 7] = 3.0
        after = layer(x)
        ref = reference.spmm(x, layer.sparse.values, layer.sparse.pattern, layer.bias)
    torch.testing.assert_close(after, ref, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(before, after)


# --- the backend object -------------------------------------------------------------------------
def test_status_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparseode.ops.triton import TritonBackend

    backend = TritonBackend()
    assert backend.status() == (True, "")
    assert backend.device_types == ("cuda", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        assert backend.status() == (False, "no GPU; set TRITON_INTERPRET=1 to run through the interpreter")
        assert backend.device_types == ("cuda",)
        with pytest.raises(ValueError, match="runs on cuda"):
            backend.check(torch.zeros(2))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert backend.status() == (False, "triton is not installed")


def test_unsupported_dtype_is_a_clear_error() -> None:
    from sparseode.ops.triton import TRITON

    with pytest.raises(TypeError, match="supports dtypes float32, float16, bfloat16, float64; got torch.int32"):
        TRITON.check(torch.zeros(2, dtype=torch.int32))


def test_interpreter_runs_one_fixed_config_and_never_autotunes() -> None:
    from sparseode.kernels import epilogue, tuning

    assert epilogue.ACTIVATIONS == ACTIVATIONS  # the codes the kernels are compiled with
    for name in ("block_spmm", "block_sddmm", "csr_spmm", "csr_sddmm"):
        launcher = tuning.launcher(name)
        assert launcher.tuned is None and launcher.fixed is not None


def test_importing_sparseode_and_asking_status_never_imports_triton() -> None:
    code = ("import sys, sparseode, sparseode.kernels, sparseode.ops.triton as t; t.TRITON.status(); "
            "sparseode.backends(); assert 'triton' not in sys.modules, 'triton was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _aot_graphs(graphs: list[str]):
    """A torch.compile backend recording the AOT forward and backward graphs' code."""
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    return aot_autograd(fw_compiler=record, bw_compiler=record)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "masked"])
def test_a_pinned_training_step_compiles_through_the_triton_twins(fmt: str) -> None:
    """A layer pinned to Triton calls the ``triton_op`` twins: a training step compiles with
    fullgraph=True and matches eager; under the interpreter the twins stay whole ops in the traced
    graphs (their kernels need real tensors; on a GPU the graphs hold the kernels themselves,
    tests/ops/test_cuda.py)."""
    layer, x = _layer(fmt, FORMAT_SHAPES[fmt], activation="tanh")
    x = x.reshape(-1, layer.in_features)
    graphs: list[str] = []
    step = torch.compile(lambda z: layer(z).pow(2).sum(), fullgraph=True, backend=_aot_graphs(graphs))
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    step(xc).backward()
    got = (xc.grad.clone(), layer.sparse.values.grad.clone())
    layer.zero_grad()
    layer(xe).pow(2).sum().backward()
    torch.testing.assert_close(got, (xe.grad, layer.sparse.values.grad), atol=ATOL, rtol=RTOL)
    assert len(graphs) == 2 and f"sparseode.triton_{fmt}_spmm" in graphs[0]
    assert f"sparseode.triton_{fmt}_spmm_t" in graphs[1] and f"sparseode.triton_{fmt}_sddmm" in graphs[1]


def test_with_triton_selected_a_layer_calls_the_twins() -> None:
    """backend="auto" with Triton selected for the device calls the twins too (a compiled graph
    then holds them, and on a GPU their kernels), and gives the reference's answer."""
    layer, x = _layer("csr", FORMAT_SHAPES["csr"], activation="tanh")
    auto = SparseLinear(layer.sparse, layer.bias.detach(), backend="auto", activation="tanh")
    x = x.reshape(-1, auto.in_features).requires_grad_()
    with use_backend("triton", "cpu"):
        y = auto(x)
        assert "triton_csr_spmm" in y.grad_fn.name()
        graphs: list[str] = []
        step = torch.compile(lambda z: auto(z).sum(), fullgraph=True, backend=_aot_graphs(graphs))
        torch.testing.assert_close(step(x), y.sum(), atol=ATOL, rtol=RTOL)
        assert "sparseode.triton_csr_spmm" in graphs[0]
    _check_against_reference(auto, x.detach())
