"""The backward of the fused field on the GPU: ``sparseode::mlp_field_backward``'s CUDA kernel.

The CPU op (csrc/cpu/field_backward_cpu.cpp) runs the hand-written backward tile by tile in C++;
this is the same formulas as whole-batch torch ops on CUDA tensors (elementwise work, dense
matmuls of the dense layers on cuBLAS) around the two sparse products on feature-major panels,
which run on Triton kernels (field.py: ``W^T a`` and the weight gradient at the stored positions).
It reads the products the forward saved (identical to the CPU op's, see field_launch), so both
devices give the same gradients. No autograd graph, no double backward; second derivatives
through it are not supported. Under TRITON_INTERPRET=1 it also takes CPU tensors (tests).

For layer l, with pre = s * u + c, h = act(pre), Tpre = s * V, T = act'(pre) * Tpre and the
adjoints gh, gT of h and T:

    gTpre = act'(pre) gT,   gpre = act'(pre) gh + act''(pre) sum_k gT_k Tpre_k,
    gc = sum_b gpre,  gs = sum_b (gpre u + sum_k gTpre_k V_k),  gu = s gpre,  gV = s gTpre,
    gW = [gu | gV] [h_in | T_in]^T (at the stored positions),  [gh_in | gT_in] = W^T [gu | gV].
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparseode.nn.fused_field_backward import CSR_FIELDS, tangent_count

from .field_launch import field_sddmm_fm, field_spmm_t_fm


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


class _Layer:
    """One layer's weight and, for CSR, its pattern, with the two products of the backward."""

    def __init__(self, weight: Tensor, pattern: list[Tensor] | None) -> None:
        self.weight, self.pattern = weight, pattern

    def transposed_product(self, a: Tensor) -> Tensor:
        """W^T a for a feature-major panel a (N, P) -> (K, P)."""
        if self.pattern is None:
            return self.weight.t() @ a
        crow, col, crow_t, col_t, perm = self.pattern
        return field_spmm_t_fm(a, self.weight[perm], crow_t, col_t)

    def weight_grad(self, a: Tensor, c: Tensor, extra: Tensor | None = None) -> Tensor:
        """(a c^T [+ extra (N, K)]) at the stored positions: a (N, P), c (K, P)."""
        if self.pattern is None:
            g = a @ c.t()
            return g if extra is None else g + extra
        crow, col = self.pattern[0], self.pattern[1]
        g = field_sddmm_fm(a, c, crow, col)
        if extra is not None:
            rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow[1:] - crow[:-1])
            g = g + extra[rows, col]
        return g


def _layers(weights: list[Tensor], patterns: list[Tensor]) -> list[_Layer]:
    layers, p = [], 0
    for w in weights:
        if w.dim() == 2:
            layers.append(_Layer(w, None))
        else:
            layers.append(_Layer(w, patterns[p:p + CSR_FIELDS]))
            p += CSR_FIELDS
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
    m = tangent_count(trace, d)
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


def mlp_field_backward(z: Tensor, probe: Tensor | None, weights: list[Tensor], patterns: list[Tensor],
                       scales: list[Tensor | None], shifts: list[Tensor | None], saved: list[Tensor],
                       grad_f: Tensor | None, grad_trace: Tensor | None, activation: str, trace: int
                       ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """(grad z (B, d), grad probe ((B, d) for Hutchinson with grad_trace, else (0,)), grad per weight
    (shaped like it), grad per scale and per shift ((0,) where that entry is None)): the contract of
    the op's schema in csrc/ops.cpp, from the forward's ``saved`` products."""
    if trace not in (0, 1, 2):
        raise ValueError(f"mlp_field_backward: trace must be 0, 1 or 2, got {trace}")
    if len(saved) != len(weights):
        raise ValueError(f"mlp_field_backward: saved holds {len(saved)} products for {len(weights)} layers "
                         "(run the forward with save=True)")
    gtr = grad_trace if trace else None
    B, d = z.shape
    m = tangent_count(trace, d)
    layers = _layers(weights, patterns)
    panels, cache = _hidden_states(z, probe, scales, shifts, saved, activation, trace)
    L = len(layers)
    g_w, g_s, g_c = [None] * L, [None] * L, [None] * L
    gu, gv, g_s[-1], gc_last, gprobe = _last_layer_adjoints(z, probe, scales[-1], saved[-1], grad_f, gtr, trace)
    g_c[-1] = gc_last if shifts[-1] is not None else None
    a = _panel(gu, gv)  # (N, (1 + m') B), m' = m when the trace term has a gradient, else 0
    mm = m if gv is not None else 0
    gz = z.new_zeros(z.shape)
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
            gz = back[:, :B].t().contiguous()
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
    empty = z.new_empty((0,))
    gprobe = gprobe.contiguous() if trace == 2 and gtr is not None and gprobe is not None else empty
    return (gz, gprobe, [g.contiguous() for g in g_w], [g if g is not None else empty for g in g_s],
            [g if g is not None else empty for g in g_c])
