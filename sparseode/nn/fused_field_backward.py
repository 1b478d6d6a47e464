"""Fake kernel and hand-written backward of ``sparseode::mlp_field`` (see ``fused_field``).

What is saved: the op's forward writes, per layer, its matrix products ``u = W h`` and ``V = W T``
(the tangents), feature-major (N, 1 + m, B); the last layer only the rows of ``W T`` the trace
reads. Everything else (pre-activations, activations, their first and second derivatives,
scaled tangents) is elementwise and recomputed here from those products: the products are what
costs, and saving one (N, (1 + m) B) panel per layer is half the memory of saving both the
products and the activations. When the forward ran without ``save`` (no gradient was expected),
the backward reruns the op with ``save`` once.

The backward is Python calling the CPU kernels of csrc/cpu/field_backward_cpu.cpp (``W^T a`` and the
weight gradient at the stored positions, on feature-major panels) for CSR layers and dense matmuls
for dense layers, with explicit formulas (no autograd graph through per-layer ops). For layer l,
with pre = s * u + c, h = act(pre), Tpre = s * V, T = act'(pre) * Tpre and the adjoints gh, gT of
h and T:

    gTpre = act'(pre) gT,   gpre = act'(pre) gh + act''(pre) sum_k gT_k Tpre_k,
    gc = sum_b gpre,  gs = sum_b (gpre u + sum_k gTpre_k V_k),  gu = s gpre,  gV = s gTpre,
    gW = [gu | gV] [h_in | T_in]^T (at the stored positions),  [gh_in | gT_in] = W^T [gu | gV].

The tangents entering the first layer are the unit vectors (exact trace: implicit, their weight
gradient is ``sum_b gV``) or the probe (whose gradient is returned). Second derivatives through
this backward are not supported.
"""
from __future__ import annotations

import torch
from torch import Tensor

_CSR_FIELDS = 5


def _act_derivatives(name: str, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(act(pre), act'(pre), act''(pre)) for the activations of the fused op."""
    if name == "identity":
        return pre, torch.ones_like(pre), torch.zeros_like(pre)
    if name == "tanh":
        y = torch.tanh(pre)
        d1 = 1 - y * y
        return y, d1, -2 * y * d1
    if name == "relu":
        return torch.relu(pre), (pre > 0).to(pre.dtype), torch.zeros_like(pre)
    if name in ("sigmoid", "softplus", "swish"):
        s = torch.sigmoid(pre)
        ds = s * (1 - s)
        if name == "sigmoid":
            return s, ds, ds * (1 - 2 * s)
        if name == "softplus":
            return torch.nn.functional.softplus(pre), s, ds
        return pre * s, s + pre * ds, 2 * ds + pre * ds * (1 - 2 * s)
    if name == "elu":
        e = torch.expm1(torch.clamp(pre, max=0))
        pos = pre > 0
        return torch.where(pos, pre, e), torch.where(pos, torch.ones_like(pre), e + 1), torch.where(
            pos, torch.zeros_like(pre), e + 1)
    raise ValueError(f"no fused activation {name!r}")


def _tangent_count(trace: int, d: int) -> int:
    return d if trace == 1 else (1 if trace == 2 else 0)


def _layer_sizes(z: Tensor, weights: list[Tensor], patterns: list[Tensor]) -> list[tuple[int, int]]:
    sizes, p, k = [], 0, z.shape[1]
    for w in weights:
        if w.dim() == 2:
            n = w.shape[0]
        else:
            n = patterns[p].shape[0] - 1
            p += _CSR_FIELDS
        sizes.append((n, k))
        k = n
    return sizes


def _fake(z, probe, weights, patterns, scales, shifts, activation, trace, save):
    B, d = z.shape
    m = _tangent_count(trace, d)
    saved = []
    if save:
        sizes = _layer_sizes(z, weights, patterns)
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


class _Layer:
    """One layer's weight and, for CSR, its pattern, with the two products of the backward."""

    def __init__(self, weight: Tensor, pattern: list[Tensor] | None) -> None:
        self.weight, self.pattern = weight, pattern

    def transposed_product(self, a: Tensor) -> Tensor:
        """W^T a for a feature-major panel a (N, P) -> (K, P)."""
        if self.pattern is None:
            return self.weight.t() @ a
        crow, col, crow_t, col_t, perm = self.pattern
        return torch.ops.sparseode.field_spmm_t_fm(a, self.weight[perm], crow_t, col_t)

    def weight_grad(self, a: Tensor, c: Tensor, extra: Tensor | None = None) -> Tensor:
        """(a c^T [+ extra (N, K)]) at the stored positions: a (N, P), c (K, P)."""
        if self.pattern is None:
            g = a @ c.t()
            return g if extra is None else g + extra
        crow, col = self.pattern[0], self.pattern[1]
        g = torch.ops.sparseode.field_sddmm_fm(a, c, crow, col)
        if extra is not None:
            rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow[1:] - crow[:-1])
            g = g + extra[rows, col]
        return g


def _layers(weights: list[Tensor], patterns: list[Tensor]) -> list[_Layer]:
    layers, p = [], 0
    for w in weights:
        if w.dim() == 2:
            layers.append(_Layer(w, None))
        else:
            layers.append(_Layer(w, patterns[p:p + _CSR_FIELDS]))
            p += _CSR_FIELDS
    return layers


def _panel(states: Tensor, tangents: Tensor | None) -> Tensor:
    """[states (N, B) | tangents (N, m, B) flattened] -> (N, (1 + m) B)."""
    if tangents is None:
        return states
    return torch.cat([states, tangents.reshape(states.shape[0], -1)], dim=1)


def _hidden_states(z, probe, scales, shifts, saved, activation, trace):
    """Recompute, per hidden layer, what the backward needs from the saved products: the input
    panels [h | T] (K, 1 + m, B) of every layer (the first: z and the probe, or None) and, per
    hidden layer, (u, v, act', act'', Tpre)."""
    B, d = z.shape
    m = _tangent_count(trace, d)
    first = torch.cat([z.t(), probe.t()], 1).reshape(d, 2, B) if trace == 2 else None
    panels, cache = [first], []
    for i in range(len(saved) - 1):
        u, v = saved[i][:, 0], (saved[i][:, 1:] if m else None)
        s, c = scales[i], shifts[i]
        pre = u * s[:, None] if s is not None else u
        pre = pre + c[:, None] if c is not None else pre
        y, d1, d2 = _act_derivatives(activation, pre)
        tpre = (v * s[:, None, None] if s is not None else v) if m else None
        cache.append((u, v, d1, d2, tpre))
        panel = u.new_empty((u.shape[0], 1 + m, B))  # written in place: no concatenation
        panel[:, 0].copy_(y)
        if m:
            torch.mul(tpre, d1[:, None, :], out=panel[:, 1:])
        panels.append(panel)
    return panels, cache


def _last_layer_adjoints(z, probe, scale, saved_last, gf, gtr, trace):
    """(gu (d, B), gV (d, m, B) or None, gs, gc, gprobe contribution) of the last layer."""
    B, d = z.shape
    u = saved_last[:, 0]
    gpre = gf.t() if gf is not None else u.new_zeros((d, B))
    sv = scale if scale is not None else u.new_ones(d)
    gs = (gpre * u).sum(1) if scale is not None else None
    gv, gprobe = None, None
    if trace and gtr is not None:
        r = saved_last[:, 1]
        if trace == 1:  # trace = sum_k s_k r_k: only row k of tangent k
            gv = torch.diag_embed((sv[:, None] * gtr[None, :]).t(), dim1=0, dim2=1)  # (d, d, B), [k, k] only
            weight = gtr[None, :]
        else:  # trace = sum_n e_n s_n r_n
            e = probe.t()
            gv = (e * gtr[None, :] * sv[:, None]).reshape(d, 1, B)
            weight = e * gtr[None, :]
            gprobe = (gtr[None, :] * sv[:, None] * r).t()
        if scale is not None:
            gs = gs + (r * weight).sum(1)
    return gpre * sv[:, None], gv, gs, gpre.sum(1), gprobe


def _hidden_adjoints(gh, gt, cache_entry, scale, has_shift):
    """The adjoint panel [gu | gV] (N, 1 + m', B) of a hidden layer from the adjoints gh (N, B) and
    gT (N, m, B) or None of its outputs, with the layer's (gs, gc)."""
    u, v, d1, d2, tpre = cache_entry
    a = gh.new_empty((gh.shape[0], 1 + (gt.shape[1] if gt is not None else 0), gh.shape[1]))
    gpre = a[:, 0]
    torch.mul(gh, d1, out=gpre)
    gtpre = None
    if gt is not None:
        gtpre = a[:, 1:]
        torch.mul(gt, d1[:, None, :], out=gtpre)
        gpre.addcmul_(d2, (gt * tpre).sum(1))
    gc = gpre.sum(1) if has_shift else None
    gs = None
    if scale is not None:
        gs = (gpre * u).sum(1) + ((gtpre * v).sum((1, 2)) if gtpre is not None else 0)
        a.mul_(scale[:, None, None])  # gu = s gpre, gV = s gTpre
    return a, gs, gc


def _backward(ctx, gf, gtr, _gsaved):
    z, probe, weights, patterns, scales, shifts, saved = _unpack(ctx)
    activation, trace = ctx.activation, ctx.trace
    if not saved:  # the forward expected no gradient: rerun it with its products saved
        with torch.no_grad():
            _, _, saved = torch.ops.sparseode.mlp_field(z, probe, weights, patterns, scales, shifts, activation,
                                                        trace, True)
    B, d = z.shape
    m = _tangent_count(trace, d)
    layers = _layers(weights, patterns)
    panels, cache = _hidden_states(z, probe, scales, shifts, saved, activation, trace)
    L = len(layers)
    g_w, g_s, g_c = [None] * L, [None] * L, [None] * L
    gu, gv, g_s[-1], gc_last, gprobe = _last_layer_adjoints(z, probe, scales[-1], saved[-1], gf, gtr, trace)
    g_c[-1] = gc_last if shifts[-1] is not None else None
    a = _panel(gu, gv)  # (N, (1 + m') B), m' = m when the trace term has a gradient, else 0
    mm = m if gv is not None else 0
    gz = None
    for i in range(L - 1, -1, -1):
        K = layers[i].weight.shape[1] if layers[i].pattern is None else layers[i].pattern[2].shape[0] - 1
        if i == 0:
            states = z.t()
            if mm and trace == 1:  # unit-vector tangents: their weight gradient is sum_b gV
                g_w[0] = layers[0].weight_grad(a[:, :B], states, a[:, B:].reshape(-1, m, B).sum(-1))
            elif mm:
                g_w[0] = layers[0].weight_grad(a, panels[0].reshape(d, -1))
            else:
                g_w[0] = layers[0].weight_grad(a, states)
            back = layers[0].transposed_product(a if trace == 2 else a[:, :B])
            gz = back[:, :B].t()
            if trace == 2 and mm:
                gp = back[:, B:].t()
                gprobe = gp if gprobe is None else gprobe + gp
            break
        inputs = panels[i].reshape(K, -1) if mm else panels[i][:, 0]
        g_w[i] = layers[i].weight_grad(a, inputs)
        back = layers[i].transposed_product(a)
        gh, gt = back[:, :B], (back[:, B:].reshape(K, mm, B) if mm else None)
        panel, g_s[i - 1], g_c[i - 1] = _hidden_adjoints(gh, gt, cache[i - 1], scales[i - 1],
                                                         shifts[i - 1] is not None)
        a = panel.reshape(K, -1)
    # a list holding None reaches torch.library's autograd as one opaque argument: its gradient is None
    g_s = None if not all(ctx.has_scale) else g_s
    g_c = None if not all(ctx.has_shift) else g_c
    return gz, gprobe, g_w, [None] * len(patterns), g_s, g_c, None, None, None


def register() -> None:
    """Register the fake kernels (the op and its backward's two products) and the autograd formula
    of ``sparseode::mlp_field``."""
    torch.library.register_fake("sparseode::mlp_field", _fake)
    torch.library.register_fake("sparseode::field_spmm_t_fm",
                                lambda a, values_t, crow_t, col_t: a.new_empty((crow_t.shape[0] - 1, a.shape[1])))
    torch.library.register_fake("sparseode::field_sddmm_fm", lambda a, c, crow, col: a.new_empty(col.shape))
    torch.library.register_autograd("sparseode::mlp_field", _backward, setup_context=_setup)
