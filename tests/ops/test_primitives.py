"""Every format x backend against the float64 reference: forward, input and weight gradients,
double backward; plus gradcheck of the reference itself. (opcheck: test_opcheck.py.)"""
import pytest
import torch

from sparseode.nn import SparseLinear
from sparseode.ops import ACTIVATIONS, SparseWeight, reference, spmm, spmm_fm, use_backend
from sparseode.testing import DTYPES, FORMATS, SHAPES, Shape, TOLERANCES, backend_skip_reason, make_case

CPU_BACKENDS = ("torch", "cpu", "triton")


def _weight(shape, fmt, dtype, backend="torch"):
    x, w, mask, b = make_case(shape, dtype)
    block = shape.block if fmt == "bsr" else (16, 16)
    return x, w, mask, b, SparseWeight.from_dense(w, mask, format=fmt, block=block)


def _skip(backend, dtype=torch.float32):
    why = backend_skip_reason(backend)
    if why:
        pytest.skip(why)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels are tested in float32 (tests/ops/test_triton.py)")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("fmt", FORMATS)
def test_format_round_trip_is_exact(shape, fmt):
    _, w, mask, _, sw = _weight(shape, fmt, torch.float64)
    assert torch.equal(sw.to_dense(), w * mask)
    assert torch.equal(sw.kept_mask(), mask)
    assert sw.nnz() == int(mask.sum())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_sparse_linear_matches_reference(shape, fmt, dtype, backend):
    """Forward, input gradient, weight and bias gradients through the public SparseLinear."""
    _skip(backend, dtype)
    x, w, mask, b, sw = _weight(shape, fmt, dtype)
    layer = SparseLinear(sw, b, backend=backend)
    x = x.clone().requires_grad_()
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()

    x64 = x.detach().double().requires_grad_()
    v64 = sw.values.detach().double().requires_grad_()
    b64 = b.double().requires_grad_()
    y64 = reference.spmm(x64.reshape(-1, shape.inp), v64, sw.pattern, b64).reshape(y.shape)
    (y64 * gy.double()).sum().backward()

    atol, rtol = TOLERANCES[dtype]
    assert y.shape == (*shape.lead, shape.out)
    torch.testing.assert_close(y.double(), y64, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.sparse.values.grad.double(), v64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.bias.grad.double(), b64.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_activation_matches_reference(fmt, backend, activation):
    _skip(backend)
    shape = SHAPES[3]
    x, w, mask, b, sw = _weight(shape, fmt, torch.float32)
    x = x * 3  # reach the saturating parts of tanh/sigmoid and both sides of relu/elu
    with use_backend(backend, "cpu"):
        y = spmm(x, sw.values, sw.pattern, b, activation)
    y64 = reference.spmm(x.double(), sw.values.double(), sw.pattern, b.double(), activation)
    torch.testing.assert_close(y.double(), y64, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("backend", ("torch", "cpu"))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("activation", ("identity", "tanh", "softplus"))
def test_gradcheck_and_gradgradcheck_float64(fmt, backend, activation):
    _skip(backend, torch.float64)
    shape = Shape((3,), 8, 12, 0.4, (4, 3), "empty_cols")  # small: gradcheck is O(elements^2)
    x, w, mask, b, sw = _weight(shape, fmt, torch.float64)
    x.requires_grad_()
    b.requires_grad_()
    v = sw.values.detach().clone().requires_grad_()

    def f(x, v, b):
        return spmm(x, v, sw.pattern, b, activation)

    with use_backend(backend, "cpu"):
        assert torch.autograd.gradcheck(f, (x, v, b))
        assert torch.autograd.gradgradcheck(f, (x, v, b), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_input(fmt, backend):
    _skip(backend)
    shape = SHAPES[4]
    _, w, mask, b, sw = _weight(shape, fmt, torch.float32)
    x = torch.randn(shape.inp, 11).t()  # (11, in), not contiguous
    assert not x.is_contiguous()
    layer = SparseLinear(sw, b, backend=backend)
    torch.testing.assert_close(layer(x), x @ (w * mask).t() + b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_nonfinite_input_propagates_like_dense(fmt, backend, bad):
    _skip(backend)
    shape = SHAPES[3]
    x, w, mask, b, sw = _weight(shape, fmt, torch.float32)
    x[2, 5] = bad  # row 2; column 5 is pruned in some rows, kept in others
    x[7, 0] = bad
    y = SparseLinear(sw, b, backend=backend)(x)
    dense = x @ (w * mask).t() + b
    assert torch.equal(torch.isnan(y), torch.isnan(dense))
    assert torch.equal(torch.isinf(y), torch.isinf(dense))
    finite = torch.isfinite(dense)
    torch.testing.assert_close(y[finite], dense[finite], atol=2e-5, rtol=2e-5)


def test_partly_kept_bsr_block_gets_no_gradient():
    w = torch.randn(8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 0] = mask[5, 6] = True  # two partly kept 4x4 blocks
    sw = SparseWeight.from_dense(w, mask, format="bsr", block=(4, 4))
    assert sw.values.shape == (2, 4, 4)
    assert int((sw.values != 0).sum()) == 2
    layer = SparseLinear(sw, None, backend="torch")
    layer(torch.randn(10, 8)).sum().backward()
    grad = layer.sparse.values.grad
    assert torch.count_nonzero(grad[~sw.block_mask]) == 0
    assert torch.count_nonzero(grad[sw.block_mask]) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES[:8], ids=lambda s: s.id)
def test_feature_major_spmm_matches_reference(shape, fmt, backend):
    """xT (K, B) -> (N, B), bias and activation on the leading state columns only."""
    _skip(backend)
    if backend == "triton" and shape.out * shape.inp > 2000:
        pytest.skip("Triton's spmm_fm is its spmm between transposes: the interpreter runs the small shapes")
    x, w, mask, b, sw = _weight(shape, fmt, torch.float32)
    xT = torch.randn(shape.inp, 3 * 37)  # 111 columns: full tiles and a partial one
    xT[1 % shape.inp, 40] = float("nan")
    for act_cols in (0, 37, 111):
        with use_backend(backend, "cpu"):
            got = spmm_fm(xT, sw.values.detach(), sw.pattern, b, "tanh", act_cols)
        want = reference.spmm_fm(xT.double(), sw.values.double(), sw.pattern, b.double(), "tanh", act_cols)
        torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=3e-5, equal_nan=True)
        assert torch.equal(torch.isnan(got), torch.isnan(want))


@pytest.mark.parametrize("backend", ("torch", "cpu"))
@pytest.mark.parametrize("fmt", FORMATS)
def test_feature_major_spmm_gradcheck_and_gradgradcheck(fmt, backend):
    _skip(backend, torch.float64)
    shape = Shape((3,), 8, 12, 0.4, (4, 3), "empty_cols")
    _, w, mask, b, sw = _weight(shape, fmt, torch.float64)
    xT = torch.randn(shape.inp, 9, dtype=torch.float64, requires_grad=True)
    v = sw.values.detach().clone().requires_grad_()
    b.requires_grad_()

    def f(xT, v, b):
        return spmm_fm(xT, v, sw.pattern, b, "tanh", 4)

    with use_backend(backend, "cpu"):
        assert torch.autograd.gradcheck(f, (xT, v, b))
        assert torch.autograd.gradgradcheck(f, (xT, v, b), fast_mode=True)
