"""The fused field op ``sparseode::mlp_field``: values and gradients against the plain dense field
with the autograd trace, gradcheck, opcheck, and the fields of sparseode.models through it (the
backward op on its own: test_fused_field_backward.py)."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparseode as so
from sparseode.models import CNF, MLPVectorField
from sparseode.models.cnf import exact_trace, hutchinson_trace
from sparseode.models.vector_field import ConcatLinear, ConcatSquashLinear
from sparseode.nn import fused_field as ff
from sparseode.nn.folded import FoldedConcatLinear
from sparseode.nn.sparse_linear import SparseLinear
from sparseode.testing import field_op_args, relative_error

pytestmark = pytest.mark.skipif(not ff.op_available()[0], reason=f"no fused field op: {ff.op_available()[1]}")

ACTIVATIONS = ff.FUSED_ACTIVATIONS
TRACES = (0, 1, 2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("trace", TRACES)
@pytest.mark.parametrize("time", ("mixed", "concatsquash"))
def test_op_matches_dense_reference(activation, trace, time):
    # odd widths, a layer of density 0 and one of density 1, batches 1 and 37 (partial tiles)
    for B, widths, dens in ((1, (5,), ()), (37, (19, 23, 11), (0.0, 1.0)), (37, (33, 17), (0.3,))):
        args = field_op_args(3, widths, dens, B, time, trace, torch.float64)
        f, term, _ = torch.ops.sparseode.mlp_field(*args, activation, trace, False)
        want_f, want_term = ff.mlp_field_reference(*args, activation, trace)
        torch.testing.assert_close(f, want_f, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(term, want_term, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("trace", TRACES)
def test_op_float32_close_to_float64(trace):
    args64 = field_op_args(2, (64, 64), (0.1,), 300, "concatsquash", trace, torch.float64)
    args32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args64[:2]]
    args32 += [[t.float() if t is not None and t.is_floating_point() else t for t in lst] for lst in args64[2:]]
    f, term, _ = torch.ops.sparseode.mlp_field(*args32, "tanh", trace, False)
    want_f, want_term = ff.mlp_field_reference(*args64, "tanh", trace)
    assert relative_error(f.double(), want_f) < 1e-5
    if trace:
        assert relative_error(term.double(), want_term) < 1e-5


def _gradcheck_fn(activation, trace, n_w, n_p, scale_idx, shift_idx, n_layers):
    def fn(z, probe, *flat):
        weights = list(flat[:n_w])
        patterns = list(flat[n_w:n_w + n_p])
        rest = list(flat[n_w + n_p:])
        scales = [rest.pop(0) if i in scale_idx else None for i in range(n_layers)]
        shifts = [rest.pop(0) if i in shift_idx else None for i in range(n_layers)]
        f, term, _ = torch.ops.sparseode.mlp_field(z, probe, weights, patterns, scales, shifts, activation, trace,
                                                   True)
        return f, term

    return fn


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("trace", TRACES)
@pytest.mark.parametrize("time", ("concat", "concatsquash"))
def test_gradcheck(activation, trace, time):
    z, probe, weights, patterns, scales, shifts = field_op_args(2, (5, 7), (0.5,), 3, time, trace, torch.float64,
                                                                seed=3)
    if activation == "relu":  # keep pre-activations away from the kink, where finite differences fail
        z = z * 0.1
    leaves = [z, *(probe,) * (probe is not None), *weights, *(s for s in scales if s is not None),
              *(c for c in shifts if c is not None)]
    for t in leaves:
        t.requires_grad_(True)
    scale_idx = {i for i, s in enumerate(scales) if s is not None}
    shift_idx = {i for i, c in enumerate(shifts) if c is not None}
    fn = _gradcheck_fn(activation, trace, len(weights), len(patterns), scale_idx, shift_idx, len(weights))
    inputs = (z, probe, *weights, *patterns, *(s for s in scales if s is not None),
              *(c for c in shifts if c is not None))
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("trace", TRACES)
def test_gradcheck_density_zero_and_one_batch_one(trace):
    z, probe, weights, patterns, scales, shifts = field_op_args(3, (4, 6, 5), (0.0, 1.0), 1, "concatsquash", trace,
                                                                torch.float64, seed=5)
    for t in [z, *weights, *scales, *shifts] + ([probe] if probe is not None else []):
        t.requires_grad_(True)
    fn = _gradcheck_fn("softplus", trace, len(weights), len(patterns), {0, 1, 2, 3}, {0, 1, 2, 3}, 4)
    assert torch.autograd.gradcheck(fn, (z, probe, *weights, *patterns, *scales, *shifts), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("trace", TRACES)
@pytest.mark.parametrize("save", (False, True))
def test_opcheck(trace, save):
    z, probe, weights, patterns, scales, shifts = field_op_args(3, (9, 13), (0.4,), 11, "concatsquash", trace)
    for t in [z, *weights, *scales]:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.sparseode.mlp_field.default,
                          (z, probe, weights, patterns, scales, shifts, "tanh", trace, save))


# --- the fields of sparseode.models through the op ---------------------------------------------
def _pruned_field(time, activation, dim=3, hidden=(24, 17), amount=0.8, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    field = MLPVectorField(dim, hidden, time=time, activation=activation).to(dtype)
    for name, module in field.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(("gate", "hyper_bias")):
            prune.l1_unstructured(module, "weight", amount=amount)
    return field


def _trace_name(code):
    return {1: "exact", 2: "hutchinson"}.get(code)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "identity"])
@pytest.mark.parametrize("time", (None, "concat", "concatsquash"))
@pytest.mark.parametrize("trace", (1, 2))
def test_sparse_field_values_and_gradients_match_dense_autograd(activation, time, trace):
    dense = _pruned_field(time, activation)
    sparse = so.sparsify(_pruned_field(time, activation), format="csr")
    assert ff.unsupported_reason(sparse) is None
    z = torch.randn(29, 3)
    probe = torch.randn(29, 3) if trace == 2 else None
    t = torch.tensor(0.3)
    # values against the masked dense MLPVectorField with the autograd trace of sparseode.models.cnf
    want_f, neg = (exact_trace(dense, t, z) if trace == 1 else hutchinson_trace(dense, t, z, probe))
    zs = z.clone().requires_grad_(True)
    f, term = ff.fused_field(sparse, t, zs, _trace_name(trace), probe)
    assert relative_error(f, want_f) < 1e-5 and relative_error(term, -neg) < 1e-5
    # gradients of a loss of both outputs, wrt z and every parameter, against autograd through the
    # dense reference field built from the same parameters
    wf, wt = torch.randn_like(f), torch.randn_like(term)
    params = [p for p in sparse.parameters() if p.requires_grad]
    got = torch.autograd.grad((f * wf).sum() + (term * wt).sum(), [zs, *params], allow_unused=True)
    zr = z.clone().requires_grad_(True)
    ref_f, ref_term = ff.mlp_field_reference(zr, probe, *ff.field_arguments(sparse, t), sparse.activation, trace)
    want = torch.autograd.grad((ref_f * wf).sum() + (ref_term * wt).sum(), [zr, *params], allow_unused=True)
    for name, g, w in zip(["z"] + [n for n, p in sparse.named_parameters() if p.requires_grad], got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0, name
            continue
        assert relative_error(g, w) < 1e-5, name


def test_bad_arguments_name_the_argument():
    field = so.sparsify(_pruned_field(None, "tanh"), format="csr")
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="trace"):
        ff.fused_field(field, 0.0, z, "bogus")
    with pytest.raises(ValueError, match="probe"):
        ff.fused_field(field, 0.0, z, "hutchinson", torch.randn(4, 2))
    with pytest.raises(ValueError, match="z must have shape"):
        ff.fused_field(field, 0.0, torch.randn(4, 2))
    with pytest.raises(ValueError, match="t must be one time"):
        ff.fused_field(field, torch.zeros(4), z)
    args = field_op_args(3, (5,), (), 4, "mixed", 0)
    bad = list(args)
    bad[2] = [args[2][0], args[2][1][:, :2]]
    with pytest.raises(RuntimeError, match="input features"):
        torch.ops.sparseode.mlp_field(*bad, "tanh", 0, False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.sparseode.mlp_field(*args, "gelu", 0, False)


def test_mixed_none_and_differentiable_shifts_are_refused():
    z, probe, weights, patterns, scales, shifts = field_op_args(3, (5,), (), 4, "mixed", 0, torch.float64)
    assert any(c is None for c in shifts)
    next(c for c in shifts if c is not None).requires_grad_(True)
    z.requires_grad_(True)
    with pytest.raises(RuntimeError, match="shifts mixes None"):
        torch.ops.sparseode.mlp_field(z, probe, weights, patterns, scales, shifts, "tanh", 0, True)


def test_nonfinite_state_gives_nan_for_that_sample_only():
    field = so.sparsify(_pruned_field(None, "tanh"), format="csr")
    z = torch.randn(5, 3)
    z[2, 1] = float("inf")
    with torch.no_grad():
        f, term = ff.fused_field(field, 0.0, z, "exact")
    assert torch.isnan(f[2]).all() and torch.isnan(term[2])
    assert torch.isfinite(f[[0, 1, 3, 4]]).all() and torch.isfinite(term[[0, 1, 3, 4]]).all()


def test_unsupported_field_runs_layer_by_layer_with_one_warning():
    # (BSR layers run inside the op: tests/nn/test_fused_field_bsr.py)
    dense = _pruned_field(None, "tanh", hidden=(16, 16))
    field = so.sparsify(_pruned_field(None, "tanh", hidden=(16, 16)), format="csr", backend="torch")
    reason = ff.unsupported_reason(field)
    assert reason is not None and "pinned to backend 'torch'" in reason
    z = torch.randn(6, 3)
    with pytest.warns(RuntimeWarning, match="runs layer by layer.*pinned"):
        got = field(0.0, z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per field, not per call
        field(0.0, z)
    torch.testing.assert_close(got, dense(0.0, z))


def test_sparse_field_forward_goes_through_the_op(monkeypatch):
    field = so.sparsify(_pruned_field("concat", "tanh"), format="csr")
    calls = []
    real = ff.fused_field
    monkeypatch.setattr(ff, "fused_field", lambda *a, **k: calls.append(1) or real(*a, **k))
    z = torch.randn(2, 4, 3)  # leading batch dims
    out = field(0.2, z)
    assert calls and out.shape == z.shape
    with ff.per_layer():
        torch.testing.assert_close(out, field(0.2, z))
    assert len(calls) == 1


# --- CNF log-likelihood gradients through odeint and odeint_adjoint ------------------------------
def _dense_of_values(layer: SparseLinear) -> torch.Tensor:
    return ff.dense_weights([layer.sparse.values.grad], list(layer.sparse.pattern)[:5], layer.in_features)[0]


def _layer_grads(layer: nn.Module) -> list[torch.Tensor]:
    """The gradients of one field layer as dense tensors, in the layout of the dense layer."""
    if isinstance(layer, SparseLinear):
        return [_dense_of_values(layer), layer.bias.grad]
    if isinstance(layer, nn.Linear):
        w = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
        return [w.grad, layer.bias.grad]
    if isinstance(layer, FoldedConcatLinear):
        w, b = _layer_grads(layer.inner)
        return [torch.cat([w, (layer.time_weight.grad * layer.time_mask)[:, None]], 1), b]
    if isinstance(layer, ConcatLinear):
        return _layer_grads(layer.linear)
    assert isinstance(layer, ConcatSquashLinear)
    return _layer_grads(layer.linear) + [layer.gate.weight.grad, layer.gate.bias.grad, layer.hyper_bias.weight.grad]


@pytest.mark.parametrize("adjoint", (False, True), ids=("odeint", "adjoint"))
@pytest.mark.parametrize("trace", ("exact", "hutchinson"))
@pytest.mark.parametrize("time", (None, "concat", "concatsquash"))
def test_cnf_log_prob_gradients_match_masked_dense(adjoint, trace, time):
    dense = _pruned_field(time, "tanh", dtype=torch.float64)
    sparse = so.sparsify(_pruned_field(time, "tanh", dtype=torch.float64), format="csr")
    x = torch.randn(16, 3, dtype=torch.float64)
    fixed = dict(method="rk4", options={"step_size": 0.25}, adjoint=adjoint)
    losses, grads = [], []
    for field in (dense, sparse):
        cnf = CNF(field, trace=trace, **fixed)
        torch.manual_seed(7)  # the same Hutchinson probe
        xx = x.clone().requires_grad_(True)
        loss = -cnf.log_prob(xx).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([xx.grad] + [g for layer in field.layers for g in _layer_grads(layer)])
    # the loss against the dense field's plain odeint solve (same grid: the same discrete solution;
    # the dense adjoint run reports a loss 2.5e-5 off it when x requires grad, a quirk of that path)
    with torch.no_grad():
        torch.manual_seed(7)
        want_loss = -CNF(dense, trace=trace, inference_trace="autograd", method="rk4",
                         options={"step_size": 0.25}).log_prob(x).mean()
    torch.testing.assert_close(losses[1], want_loss, rtol=1e-10, atol=0)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("adjoint", (False, True), ids=("odeint", "adjoint"))
def test_cnf_training_float32_matches_masked_dense(adjoint):
    dense = _pruned_field("concatsquash", "softplus", hidden=(32, 32))
    sparse = so.sparsify(_pruned_field("concatsquash", "softplus", hidden=(32, 32)), format="csr")
    x = torch.randn(40, 3)
    grads = []
    for field in (dense, sparse):
        cnf = CNF(field, trace="exact", method="rk4", options={"step_size": 0.25}, adjoint=adjoint)
        loss = -cnf.log_prob(x).mean()
        loss.backward()
        grads.append([g for layer in field.layers for g in _layer_grads(layer)])
    for got, want in zip(*reversed(grads)):
        assert relative_error(got, want) < 1e-4
