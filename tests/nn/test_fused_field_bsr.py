"""BSR layers inside the fused field op: a BSR ``SparseLinear`` reaches ``sparseode::mlp_field`` as
the CSR view of its kept entries (``fused_field.bsr_csr_view``); values and gradients against the
masked dense field with the autograd trace, gradcheck in float64, and the view's cache."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparseode as so
from sparseode.models import MLPVectorField
from sparseode.models.cnf import exact_trace, hutchinson_trace
from sparseode.nn import fused_field as ff
from sparseode.nn.folded import FoldedConcatLinear
from sparseode.nn.sparse_linear import SparseLinear
from sparseode.ops import reference

pytestmark = pytest.mark.skipif(not ff.op_available()[0], reason=f"no fused field op: {ff.op_available()[1]}")


def _block_mask(n: int, k: int, block: tuple[int, int], density: float, gen: torch.Generator,
                empty_block_row: bool) -> torch.Tensor:
    """Unstructured kept entries of the given density, inside every second block only (so stored
    blocks hold zeros), optionally with block row 0 empty."""
    bh, bw = block
    blocks = torch.rand(n // bh, k // bw, generator=gen) < 0.5
    if empty_block_row:
        blocks[0] = False
    inside = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return inside & (torch.rand(n, k, generator=gen) < density)


def _fields(time, activation, hidden, block, densities, seed=0, dtype=torch.float32):
    """(masked dense MLPVectorField, the same field with its hidden-to-hidden layers as BSR)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dense = MLPVectorField(3, hidden, time=time, activation=activation).to(dtype)
    linears = [m for n, m in dense.named_modules() if isinstance(m, nn.Linear) and not n.endswith(("gate", "hyper_bias"))]
    for i, (layer, density) in enumerate(zip(linears[1:-1], densities)):
        n, k = layer.weight.shape
        k_blocks = k - (k % block[1])  # a concat layer's time column stays outside the blocks
        mask = torch.zeros(n, k, dtype=torch.bool)
        mask[:, :k_blocks] = _block_mask(n, k_blocks, block, density, gen, empty_block_row=i == 0)
        mask[:, k_blocks:] = True
        prune.custom_from_mask(layer, "weight", mask)
    hidden_names = {n for n, m in dense.named_modules() if any(m is x for x in linears[1:-1])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mostly-empty blocks: format="bsr" warns, which is what we test
        sparse = so.sparsify(dense, format="bsr", block=block, filter_fn=lambda name, m: name in hidden_names)
    return dense, sparse


def _bsr_layers(field):
    found = []
    for layer in field.layers:
        inner = layer.inner if isinstance(layer, FoldedConcatLinear) else getattr(layer, "linear", layer)
        if isinstance(inner, SparseLinear) and inner.format == "bsr":
            found.append(inner)
    return found


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("time", (None, "concat", "concatsquash"))
@pytest.mark.parametrize("trace", ("exact", "hutchinson"))
@pytest.mark.parametrize("activation", ("tanh", "softplus"))
def test_bsr_field_values_and_gradients_match_masked_dense(time, trace, activation):
    # odd widths tiled by 3x3 blocks, block row 0 of the first hidden layer empty
    dense, sparse = _fields(time, activation, (15, 21, 15), (3, 3), (0.4, 0.6))
    assert len(_bsr_layers(sparse)) == 2 and ff.unsupported_reason(sparse) is None
    z = torch.randn(37, 3)
    probe = torch.randn(37, 3) if trace == "hutchinson" else None
    t = torch.tensor(0.3)
    zd = z.clone().requires_grad_(True)
    want_f, neg = exact_trace(dense, t, zd) if trace == "exact" else hutchinson_trace(dense, t, zd, probe)
    zs = z.clone().requires_grad_(True)
    f, term = ff.fused_field(sparse, t, zs, trace, probe)
    assert _rel(f, want_f) < 1e-5 and _rel(term, -neg) < 1e-5
    wf, wt = torch.randn_like(f), torch.randn_like(term)
    (want_f * wf).sum().add((-neg * wt).sum()).backward()
    (f * wf).sum().add((term * wt).sum()).backward()
    assert _rel(zs.grad, zd.grad) < 1e-5
    dense_linears = [m for n, m in dense.named_modules() if hasattr(m, "weight_mask")]
    for layer, ref in zip(_bsr_layers(sparse), dense_linears):
        # the gradient of the blocks, as a dense matrix: zero at the zeros stored inside blocks
        got = reference.dense_weight(layer.sparse.values.grad, layer.sparse.pattern)
        zeros_inside = ~layer.sparse.pattern.block_mask
        assert bool(zeros_inside.any()) and float(layer.sparse.values.grad[zeros_inside].abs().max()) == 0
        want = (ref.weight_orig.grad * ref.weight_mask)[:, :layer.in_features]
        assert _rel(got, want) < 1e-5
        assert _rel(layer.bias.grad, ref.bias.grad) < 1e-5


@pytest.mark.parametrize("trace", (None, "exact"))
def test_bsr_density_zero_one_and_batch_one(trace):
    dense, sparse = _fields(None, "tanh", (8, 12, 8), (4, 4), (0.0, 1.0))
    layers = _bsr_layers(sparse)
    assert layers[0].sparse.values.numel() == 0 and bool(layers[1].sparse.pattern.block_mask.all())
    for B in (1, 9):
        z = torch.randn(B, 3)
        with torch.no_grad():
            f, term = ff.fused_field(sparse, 0.5, z, trace)
        want_f, neg = exact_trace(dense, torch.tensor(0.5), z)
        assert _rel(f, want_f) < 1e-5
        if trace:
            assert _rel(term, -neg) < 1e-5


@pytest.mark.parametrize("trace", (None, "exact", "hutchinson"))
def test_bsr_gradcheck_float64(trace):
    _, sparse = _fields("concatsquash", "tanh", (4, 6, 4), (2, 3), (0.6, 0.6), seed=2, dtype=torch.float64)
    values = [layer.sparse.values for layer in _bsr_layers(sparse)]
    z = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 3, dtype=torch.float64) if trace == "hutchinson" else None

    def fn(z, *vals):
        for layer, v in zip(_bsr_layers(sparse), vals):
            layer.sparse.values = v
        return ff.fused_field(sparse, 0.4, z, trace, probe)

    # the BSR values as plain leaves, so gradcheck perturbs them (SparseWeight holds a Parameter)
    leaves = [v.detach().clone().requires_grad_(True) for v in values]
    for layer in _bsr_layers(sparse):
        del layer.sparse.values
    assert torch.autograd.gradcheck(fn, (z, *leaves), atol=1e-6, rtol=1e-5)


def test_csr_view_is_built_once_per_pattern(monkeypatch):
    _, sparse = _fields(None, "tanh", (8, 12, 8), (4, 4), (0.5, 0.5))
    calls = []
    real = ff._csr_of_blocks
    monkeypatch.setattr(ff, "_csr_of_blocks", lambda *a: calls.append(1) or real(*a))
    z = torch.randn(5, 3)
    with torch.no_grad():
        first = sparse(0.0, z)
        sparse(0.1, z)
    assert len(calls) == 2  # two BSR layers, once each
    # a new pattern (loading a differently pruned state) builds the view again
    other_dense, other = _fields(None, "tanh", (8, 12, 8), (4, 4), (0.3, 0.7), seed=1)
    sparse.load_state_dict(other.state_dict())
    with torch.no_grad():
        got = sparse(0.0, z)
    assert len(calls) == 4
    with ff.per_layer():
        torch.testing.assert_close(got, sparse(0.0, z))
    assert not torch.allclose(got, first)
