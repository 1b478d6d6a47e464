"""Fake kernels and the autograd formula of ``sparseode::mlp_field`` (see ``fused_field``): its backward
is one call of the hand-written C++ op ``sparseode::mlp_field_backward`` (csrc/cpu/field_backward_cpu.cpp,
kernels in csrc/cpu/field_backward_kernels.h), never an autograd graph through per-layer ops.

What is saved: the op's forward writes, per layer, its matrix products ``u = W h`` and ``V = W T``
(the tangents), feature-major (N, 1 + m, B); the last layer only the rows of ``W T`` the trace
reads. Everything else (pre-activations, activations, their first and second derivatives, scaled
tangents) is elementwise and recomputed by the backward from those products, tile by tile over the
batch while the tile's rows are in cache: the products are what costs, and saving one (N, (1 + m) B)
panel per layer is half the memory of saving both the products and the activations. When the
forward ran without ``save`` (no gradient was expected), the backward reruns the op with ``save``
once.

For layer l, with pre = s * u + c, h = act(pre), Tpre = s * V, T = act'(pre) * Tpre and the
adjoints gh, gT of h and T, the backward computes (per batch tile, accumulating over tiles):

    gTpre = act'(pre) gT,   gpre = act'(pre) gh + act''(pre) sum_k gT_k Tpre_k,
    gc = sum_b gpre,  gs = sum_b (gpre u + sum_k gTpre_k V_k),  gu = s gpre,  gV = s gTpre,
    gW = [gu | gV] [h_in | T_in]^T (at the stored positions),  [gh_in | gT_in] = W^T [gu | gV].

The tangents entering the first layer are the unit vectors (exact trace) or the probe (whose
gradient is returned). Without a gradient of the trace term the tangents' adjoints are zero and the
backward carries none. Second derivatives through this backward are not supported.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparseode.ops import tangents

CSR_FIELDS = 5  # crow, col, crow_t, col_t, perm of a CSR layer's pattern


def tangent_count(trace: int, d: int) -> int:
    """Tangent columns of a trace mode: d (exact), 1 (Hutchinson) or 0 (none)."""
    return d if trace == 1 else (1 if trace == 2 else 0)


def layer_sizes(z: Tensor, weights: list[Tensor], patterns: list[Tensor]) -> list[tuple[int, int]]:
    """(N_l, K_l) of each layer of the op's arguments; z (B, d)."""
    sizes, p, k = [], 0, z.shape[1]
    for w in weights:
        if w.dim() == 2:
            n = w.shape[0]
        else:
            n = patterns[p].shape[0] - 1
            p += CSR_FIELDS
        sizes.append((n, k))
        k = n
    return sizes


def _fake(z, probe, weights, patterns, scales, shifts, activation, trace, save):
    B, d = z.shape
    m = tangent_count(trace, d)
    saved = []
    if save:
        sizes = layer_sizes(z, weights, patterns)
        for i, (n, _) in enumerate(sizes):
            groups = 1 + m if i + 1 < len(sizes) else 1 + (trace > 0)
            saved.append(z.new_empty((n, groups, B)))
    return z.new_empty((B, d)), z.new_empty((B,)), saved


def _setup(ctx, inputs, output):
    z, probe, weights, patterns, scales, shifts, activation, trace, save = inputs
    for name, vectors in (("scales", scales), ("shifts", shifts)):
        # torch.library passes a list mixing None and tensors as one opaque argument: its tensors
        # would silently get no gradient
        if any(v is None for v in vectors) and any(v is not None and v.requires_grad for v in vectors):
            raise RuntimeError(f"mlp_field: {name} mixes None and tensors that require grad; pass ones (scales) "
                               "or zeros (shifts) for the absent entries to differentiate through them")
    ctx.activation, ctx.trace = activation, trace
    ctx.n_layers, ctx.n_patterns = len(weights), len(patterns)
    ctx.has_scale = [s is not None for s in scales]
    ctx.has_shift = [c is not None for c in shifts]
    saved = list(output[2]) if save else []
    ctx.n_saved = len(saved)
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved products
    ctx.save_for_backward(z, probe, *weights, *patterns, *(s for s in scales if s is not None),
                          *(c for c in shifts if c is not None), *saved)


def _unpack(ctx):
    tensors = list(ctx.saved_tensors)
    z, probe = tensors[0], tensors[1]
    rest = tensors[2:]
    weights, rest = rest[:ctx.n_layers], rest[ctx.n_layers:]
    patterns, rest = rest[:ctx.n_patterns], rest[ctx.n_patterns:]
    scales, shifts = [], []
    for flags, out in ((ctx.has_scale, scales), (ctx.has_shift, shifts)):
        for present in flags:
            out.append(rest.pop(0) if present else None)
    saved = rest
    return z, probe, weights, patterns, scales, shifts, saved


def _backward(ctx, gf, gtr, _gsaved):
    z, probe, weights, patterns, scales, shifts, saved = _unpack(ctx)
    if not saved:  # the forward expected no gradient: rerun it with its products saved
        with torch.no_grad():
            _, _, saved = torch.ops.sparseode.mlp_field(z, probe, weights, patterns, scales, shifts, ctx.activation,
                                                        ctx.trace, True)
    gz, gprobe, g_w, g_s, g_c = torch.ops.sparseode.mlp_field_backward(
        z, probe, weights, patterns, scales, shifts, saved, gf, gtr if ctx.trace else None, ctx.activation, ctx.trace)
    gprobe = gprobe if ctx.trace == 2 and gtr is not None else None
    # a list holding None reaches torch.library's autograd as one opaque argument: its gradient is None
    g_s = list(g_s) if all(ctx.has_scale) else None
    g_c = list(g_c) if all(ctx.has_shift) else None
    return gz, gprobe, list(g_w), [None] * len(patterns), g_s, g_c, None, None, None


def _fake_backward(z, probe, weights, patterns, scales, shifts, saved, grad_f, grad_trace, activation, trace):
    def like(v):
        return z.new_empty(v.shape) if v is not None else z.new_empty((0,))

    gprobe = z.new_empty(z.shape) if trace == 2 and grad_trace is not None else z.new_empty((0,))
    return z.new_empty(z.shape), gprobe, [w.new_empty(w.shape) for w in weights], [like(s) for s in scales], [
        like(c) for c in shifts]


_LIB: torch.library.Library | None = None  # holds the autograd kernel's registration


def register() -> None:
    """Register the fake kernels of ``sparseode::mlp_field`` and its backward op, and the op's autograd
    formula (which refuses forward-mode tangents: the op has no forward-mode formula, and the plain
    ``register_autograd`` kernel would return results without tangents, so ``torch.func.jvp`` read zeros)."""
    global _LIB
    torch.library.register_fake("sparseode::mlp_field", _fake)
    torch.library.register_fake("sparseode::mlp_field_backward", _fake_backward)
    _LIB = torch.library.Library("sparseode", "IMPL")
    tangents.register_autograd("sparseode::mlp_field", _backward, _setup, _LIB)
