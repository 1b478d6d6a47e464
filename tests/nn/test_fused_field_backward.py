"""The fused field's backward op ``sparseode::mlp_field_backward`` on its own: its gradients
against autograd of the dense reference ``mlp_field_reference`` (float64 and float32, one output
gradient, split over threads, an empty batch), its argument checks and opcheck."""
import pytest
import torch

from sparseode.nn import fused_field as ff
from sparseode.testing import field_op_args, relative_error

pytestmark = pytest.mark.skipif(not ff.op_available()[0], reason=f"no fused field op: {ff.op_available()[1]}")

ACTIVATIONS = ff.FUSED_ACTIVATIONS
TRACES = (0, 1, 2)


def _backward_inputs(args, activation, trace, with_f, with_trace, seed=1):
    """(op inputs of sparseode::mlp_field_backward, the gradients autograd of the dense reference
    gives for z, probe, weights, scales, shifts) for random output gradients."""
    z, probe, weights, patterns, scales, shifts = args
    leaves = [z, probe, *weights, *scales, *shifts]
    for t in leaves:
        if t is not None:
            t.requires_grad_(True)
    f, term = ff.mlp_field_reference(z, probe, weights, patterns, scales, shifts, activation, trace)
    g = torch.Generator().manual_seed(seed)
    gf = torch.randn(f.shape, generator=g, dtype=f.dtype) if with_f else None
    gtr = torch.randn(term.shape, generator=g, dtype=f.dtype) if with_trace and trace else None
    loss = (f * gf).sum() if gf is not None else 0
    loss = loss + (term * gtr).sum() if gtr is not None else loss
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present, allow_unused=True))
    want = [next(grads) if t is not None else None for t in leaves]
    want = [w if w is not None or t is None else torch.zeros_like(t) for w, t in zip(want, leaves)]
    with torch.no_grad():
        _, _, saved = torch.ops.sparseode.mlp_field(z, probe, weights, patterns, scales, shifts, activation, trace,
                                                    True)
    detached = [[t.detach() if t is not None else None for t in lst] for lst in (weights, scales, shifts)]
    inputs = (z.detach(), probe.detach() if probe is not None else None, detached[0], patterns, detached[1],
              detached[2], saved, gf, gtr, activation, trace)
    return inputs, want


def _check_backward(inputs, want, trace, rtol):
    gz, gprobe, gw, gs, gc = torch.ops.sparseode.mlp_field_backward(*inputs)
    n = len(inputs[2])
    want_z, want_probe = want[0], want[1]
    want_w, want_s, want_c = want[2:2 + n], want[2 + n:2 + 2 * n], want[2 + 2 * n:]
    got = [gz, *gw, *(s for s, w in zip(gs, want_s) if w is not None), *(c for c, w in zip(gc, want_c) if w is not None)]
    ref = [want_z, *want_w, *(w for w in want_s if w is not None), *(w for w in want_c if w is not None)]
    if trace == 2 and inputs[8] is not None:
        got.append(gprobe)
        ref.append(want_probe)
    else:
        assert gprobe.numel() == 0
    assert all(s.numel() == 0 for s, w in zip(gs, want_s) if w is None)
    assert all(c.numel() == 0 for c, w in zip(gc, want_c) if w is None)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, i
        if a.numel():  # a density-0 layer stores no values
            assert relative_error(a.double(), b.double()) < rtol, (i, relative_error(a.double(), b.double()))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("trace", TRACES)
@pytest.mark.parametrize("time", ("mixed", "concatsquash"))
def test_backward_op_matches_dense_autograd(activation, trace, time):
    # one dense d -> d layer, batch 1; odd widths with a layer of density 0 (empty rows and columns)
    # and one of density 1, partial tiles; some scales and shifts None
    for B, widths, dens in ((1, (), ()), (1, (5,), ()), (37, (19, 23, 11), (0.0, 1.0)), (70, (33, 17), (0.3,))):
        args = field_op_args(3, widths, dens, B, time, trace, torch.float64, seed=B + len(widths))
        inputs, want = _backward_inputs(args, activation, trace, True, True)
        _check_backward(inputs, want, trace, 1e-10)


@pytest.mark.parametrize("trace", (1, 2))
@pytest.mark.parametrize("with_f, with_trace", ((False, True), (True, False)), ids=("trace-grad-only", "f-grad-only"))
def test_backward_op_with_one_output_gradient(trace, with_f, with_trace):
    args = field_op_args(2, (13, 9), (0.4,), 45, "concatsquash", trace, torch.float64, seed=4)
    inputs, want = _backward_inputs(args, "swish", trace, with_f, with_trace)
    _check_backward(inputs, want, trace, 1e-10)


@pytest.mark.parametrize("trace", TRACES)
def test_backward_op_float32_close_to_float64(trace):
    # the benchmark's shape class (2 -> 64x2, density 0.1) at a batch of several tiles per thread
    args64 = field_op_args(2, (64, 64), (0.1,), 300, "concatsquash", trace, torch.float64, seed=6)
    inputs, want = _backward_inputs(args64, "tanh", trace, True, True)
    as32 = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    as32 = [[t.float() if t is not None and t.is_floating_point() else t for t in x] if isinstance(x, list) else x
            for x in as32]
    _check_backward(as32, want, trace, 1e-5)


@pytest.mark.parametrize("trace", TRACES)
def test_backward_op_split_over_threads(trace):
    # several chunks of tiles, one gradient accumulator each, summed after
    args = field_op_args(2, (48, 40), (0.2,), 613, "concatsquash", trace, torch.float64, seed=8)
    inputs, want = _backward_inputs(args, "softplus", trace, True, True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_backward(inputs, want, trace, 1e-10)
    finally:
        torch.set_num_threads(before)


def test_backward_op_empty_batch():
    args = field_op_args(3, (5, 4), (0.5,), 0, "concatsquash", 1, torch.float64)
    with torch.no_grad():
        _, _, saved = torch.ops.sparseode.mlp_field(*args, "tanh", 1, True)
    z, probe, weights, patterns, scales, shifts = args
    gz, gprobe, gw, gs, gc = torch.ops.sparseode.mlp_field_backward(z, probe, weights, patterns, scales, shifts,
                                                                    saved, torch.zeros(0, 3, dtype=z.dtype),
                                                                    torch.zeros(0, dtype=z.dtype), "tanh", 1)
    assert gz.shape == (0, 3) and gprobe.numel() == 0
    assert all(g.shape == w.shape and float(g.abs().sum()) == 0 for g, w in zip(gw, weights))
    assert all(g.shape == s.shape and float(g.abs().sum()) == 0 for g, s in zip(gs + gc, scales + shifts))


def test_backward_op_bad_arguments_name_the_argument():
    args = field_op_args(3, (5, 4), (0.5,), 6, "concatsquash", 1)
    with torch.no_grad():
        _, _, saved = torch.ops.sparseode.mlp_field(*args, "tanh", 1, True)
    z, probe, weights, patterns, scales, shifts = args
    gf, gtr = torch.randn(6, 3), torch.randn(6)
    call = torch.ops.sparseode.mlp_field_backward
    with pytest.raises(RuntimeError, match=r"saved\[1\] must be the forward's products"):
        call(z, probe, weights, patterns, scales, shifts, [saved[0], saved[1][:, :2], saved[2]], gf, gtr, "tanh", 1)
    with pytest.raises(RuntimeError, match="saved must hold one entry per layer"):
        call(z, probe, weights, patterns, scales, shifts, saved[:2], gf, gtr, "tanh", 1)
    with pytest.raises(RuntimeError, match="grad_f must have z's shape"):
        call(z, probe, weights, patterns, scales, shifts, saved, gf[:, :2], gtr, "tanh", 1)
    with pytest.raises(RuntimeError, match="grad_trace must have shape"):
        call(z, probe, weights, patterns, scales, shifts, saved, gf, gtr[:3], "tanh", 1)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        call(z, probe, weights, patterns, scales, shifts, saved, gf, gtr, "gelu", 1)
    with pytest.raises(RuntimeError, match="grad_f must have z's dtype"):
        call(z, probe, weights, patterns, scales, shifts, saved, gf.double(), gtr, "tanh", 1)


@pytest.mark.parametrize("trace", TRACES)
def test_backward_op_opcheck(trace):
    args = field_op_args(3, (9, 13), (0.4,), 11, "concatsquash", trace)
    with torch.no_grad():
        _, _, saved = torch.ops.sparseode.mlp_field(*args, "tanh", trace, True)
    gf, gtr = torch.randn(11, 3), torch.randn(11)
    torch.library.opcheck(torch.ops.sparseode.mlp_field_backward.default,
                          (*args, saved, gf, gtr if trace else None, "tanh", trace))
