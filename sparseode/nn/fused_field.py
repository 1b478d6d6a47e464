"""The fused MLP vector field: ``sparseode::mlp_field`` runs every layer of a sparsified
``MLPVectorField`` in one op call per function evaluation (csrc/cpu/field_cpu.cpp), with the
tangents of the forward-mode trace carried along, and has a backward written by hand
(:mod:`sparseode.nn.fused_field_backward`), so a CNF training step is a forward solve plus one
reverse pass, never a double backward through per-layer ops.

The op sees layer ``l`` at time t as ``pre_l = scale_l * (W_l h_{l-1}) + shift_l`` (``h_l =
act(pre_l)``, the last layer stops at ``pre``). The time terms are computed here from t once per
call, with plain differentiable PyTorch on (width,) vectors, so the gradients of biases, time
columns, gates and hyper-biases come from autograd through these few small ops:

* ``time=None``: ``shift = b``;
* ``"concat"`` (``FoldedConcatLinear`` or a dense ``ConcatLinear``): ``shift = b + w_t t``;
* ``"concatsquash"``: ``scale = sigmoid(gate(t))``, ``shift = hyper_bias(t) + b * scale``.

Layers the op takes: ``nn.Linear`` (pruned or not), ``SparseLinear`` in CSR, BSR or masked format
(no activation of its own, backend ``auto`` or ``cpu``), inside those time layers. A BSR layer
reaches the op as the CSR pattern of its kept entries (built once per pattern and cached on the
layer, :func:`bsr_csr_view`) and the gather of those entries from its block values, so its
gradient flows back into the blocks by autograd. Anything else (another layer type) runs on the
per-layer path, with one warning per field saying why (:func:`unsupported_reason`).
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from sparseode.activations import ACTIVATIONS
from sparseode.models.vector_field import ConcatLinear, ConcatSquashLinear
from sparseode.nn.folded import FoldedConcatLinear
from sparseode.nn.sparse_linear import SparseLinear
from sparseode.ops import extension
from sparseode.ops.patterns import BSRPattern, compressed, row_of_each

#: Trace codes of the op: None (no trace), exact (the d unit vectors), Hutchinson (the probe).
TRACE_CODES: dict[str | None, int] = {None: 0, "exact": 1, "hutchinson": 2}
#: Activations the op fuses (every one the package has).
FUSED_ACTIVATIONS: tuple[str, ...] = ("identity", "tanh", "relu", "softplus", "sigmoid", "elu", "swish")
_CSR_FIELDS = 5  # crow, col, crow_t, col_t, perm


class Unsupported(Exception):
    """A field (or layer) the fused op cannot run; the message says why."""


def op_available() -> tuple[bool, str]:
    """Whether ``sparseode::mlp_field`` has a CPU kernel here, and why not."""
    ok, why = extension.load()
    if not ok:
        return False, why
    if not hasattr(torch.ops.sparseode, "mlp_field"):
        return False, "sparseode._C was built without the fused field op (rebuild it)"
    return True, ""


def _effective(linear: nn.Linear) -> Tensor:
    # weight_orig * weight_mask under torch.nn.utils.prune (.weight is refreshed only by a forward call)
    if hasattr(linear, "weight_orig") and hasattr(linear, "weight_mask"):
        return linear.weight_orig * linear.weight_mask
    return linear.weight


def _linear_parts(linear: nn.Module) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """(weight: dense (N, K) or CSR values (nnz,), its pattern tensors, bias) of a linear layer."""
    if isinstance(linear, nn.Linear):
        return _effective(linear), [], linear.bias
    if isinstance(linear, SparseLinear):
        if linear.activation != "identity":
            raise Unsupported(f"a SparseLinear with its own activation ({linear.activation!r})")
        if linear.backend not in ("auto", "cpu"):
            raise Unsupported(f"a SparseLinear pinned to backend {linear.backend!r}")
        fmt = linear.format
        if fmt == "csr":
            return linear.sparse.values, list(linear.sparse.pattern)[:_CSR_FIELDS], linear.bias
        if fmt == "masked":
            return linear.sparse.to_dense(), [], linear.bias
        if fmt == "bsr":
            index, pattern = bsr_csr_view(linear.sparse)
            return linear.sparse.values.reshape(-1)[index], pattern, linear.bias
        raise Unsupported(f"a {fmt} layer (the fused op takes dense, masked, CSR and BSR layers)")
    raise Unsupported(f"a layer of type {type(linear).__name__}")


def bsr_csr_view(sparse: nn.Module) -> tuple[Tensor, list[Tensor]]:
    """(index (nnz,), the 5 CSR pattern tensors) of a BSR ``SparseWeight``'s kept entries:
    ``values.reshape(-1)[index]`` are its CSR values. Built on the first call for a pattern and
    cached on the module (a new pattern, e.g. after loading, builds it again), never per call."""
    pattern = sparse.pattern
    cached = sparse.__dict__.get("_fused_csr_view")
    if cached is not None and all(a is b for a, b in zip(cached[0], pattern)):
        return cached[1], cached[2]
    index, csr = _csr_of_blocks(pattern, *sparse.shape)
    sparse.__dict__["_fused_csr_view"] = (tuple(pattern), index, csr)
    return index, csr


def _csr_of_blocks(pattern: BSRPattern, n: int, k: int) -> tuple[Tensor, list[Tensor]]:
    """The CSR view of bsr_csr_view, on the pattern's device (index arrays int64)."""
    n_blocks, bh, bw = pattern.block_mask.shape
    flat = pattern.block_mask.reshape(-1).nonzero().reshape(-1)  # kept entries, (block, i, j) order
    block, within = flat // (bh * bw), flat % (bh * bw)
    rows = row_of_each(pattern.crow)[block] * bh + within // bw
    cols = pattern.col[block] * bw + within % bw
    order = torch.argsort(rows * k + cols)
    rows, cols, index = rows[order].contiguous(), cols[order].contiguous(), flat[order].contiguous()
    crow, crow_t, col_t, perm = compressed(rows.cpu(), cols.cpu(), n, k)
    dev = pattern.crow.device
    return index, [t.to(dev) for t in (crow, cols, crow_t, col_t, perm)]


def _time_layer_parts(layer: nn.Module, t: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None, Tensor | None]:
    """(weight, pattern, scale, shift) of one field layer at the 0-d time t."""
    if isinstance(layer, FoldedConcatLinear):
        w, pattern, bias = _linear_parts(layer.inner)
        shift = layer.time_term() * t
        return w, pattern, None, shift if bias is None else bias + shift
    if isinstance(layer, ConcatLinear):
        weight = _effective(layer.linear)
        d, bias = layer.in_features, layer.linear.bias
        shift = weight[:, d] * t
        return weight[:, :d], [], None, shift if bias is None else bias + shift
    if isinstance(layer, ConcatSquashLinear):
        w, pattern, bias = _linear_parts(layer.linear)
        t_col = t.reshape(1, 1)
        scale = torch.sigmoid(layer.gate(t_col)).reshape(-1)
        shift = layer.hyper_bias(t_col).reshape(-1)
        return w, pattern, scale, shift if bias is None else shift + bias * scale
    w, pattern, bias = _linear_parts(layer)
    return w, pattern, None, bias


def field_arguments(field: nn.Module, t: Tensor) -> tuple[list[Tensor], list[Tensor], list, list]:
    """The op's (weights, patterns, scales, shifts) for ``field`` at the 0-d time ``t``; raises
    :class:`Unsupported` for a field the op cannot run."""
    weights, patterns, scales, shifts = [], [], [], []
    for layer in field.layers:
        w, pattern, scale, shift = _time_layer_parts(layer, t)
        weights.append(w)
        patterns.extend(pattern)
        scales.append(scale)
        shifts.append(shift)
    return weights, patterns, _complete(scales, weights, patterns, 1.0), _complete(shifts, weights, patterns, 0.0)


def _complete(vectors: list, weights: list[Tensor], patterns: list[Tensor], fill: float) -> list:
    """All None, or no None: a list mixing both cannot carry gradients through torch.library's
    autograd (see fused_field_backward), so absent entries become ``fill`` vectors."""
    if all(v is None for v in vectors) or all(v is not None for v in vectors):
        return vectors
    like = next(v for v in vectors if v is not None)
    sizes = dense_sizes(weights, patterns)
    return [like.new_full((n,), fill) if v is None else v for v, n in zip(vectors, sizes)]


def dense_sizes(weights: list[Tensor], patterns: list[Tensor]) -> list[int]:
    """Output size of every layer of the op's arguments."""
    sizes, p = [], 0
    for w in weights:
        if w.dim() == 2:
            sizes.append(w.shape[0])
        else:
            sizes.append(patterns[p].shape[0] - 1)
            p += _CSR_FIELDS
    return sizes


def unsupported_reason(field: nn.Module) -> str | None:
    """None when the fused op can run ``field`` (structure only: layer types, activation, the
    extension), else why not."""
    ok, why = op_available()
    if not ok:
        return why
    if getattr(field, "activation", None) not in FUSED_ACTIVATIONS:
        return f"activation {getattr(field, 'activation', None)!r} has no fused kernel"
    param = next(field.parameters(), None)
    t = torch.zeros((), dtype=param.dtype if param is not None else None)
    try:
        with torch.no_grad():
            for layer in field.layers:
                _time_layer_parts(layer, t)
    except Unsupported as err:
        return f"the field holds {err}"
    return None


def fused_field(field: nn.Module, t: Tensor | float, z: Tensor, trace: str | None = None,
                probe: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(f(t, z), trace term)`` of an MLP field through one ``sparseode::mlp_field`` call.

    z (B, d) float32/float64 on the CPU; t one time for the batch; ``trace`` None, ``"exact"``
    (trace term ``tr(df/dz)``, (B,)) or ``"hutchinson"`` (``eᵀ(df/dz)e`` with ``probe`` e of z's
    shape). Without a trace the second output is zeros. Differentiable in z, the probe and every
    parameter (hand-written backward).
    """
    if trace not in TRACE_CODES:
        raise ValueError(f"trace must be one of {list(TRACE_CODES)}, got {trace!r}")
    if z.dim() != 2 or z.shape[1] != field.dim:
        raise ValueError(f"z must have shape (B, {field.dim}), got {tuple(z.shape)}")
    if trace == "hutchinson" and (probe is None or probe.shape != z.shape):
        raise ValueError(f"the Hutchinson trace needs a probe of z's shape {tuple(z.shape)}, "
                         f"got {None if probe is None else tuple(probe.shape)}")
    tt = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    if tt.numel() != 1:
        raise ValueError(f"t must be one time for the whole batch, got shape {tuple(tt.shape)}")
    weights, patterns, scales, shifts = field_arguments(field, tt.reshape(()))
    tensors = [z, *weights, *(s for s in scales if s is not None), *(c for c in shifts if c is not None)]
    if probe is not None:
        tensors.append(probe)
    save = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    f, term, _ = torch.ops.sparseode.mlp_field(z, probe if trace == "hutchinson" else None, weights, patterns,
                                              scales, shifts, field.activation, TRACE_CODES[trace], save)
    return f, term


# --- the fields' entry points ------------------------------------------------------------------
def _structure_reason(field: nn.Module) -> str | None:
    """unsupported_reason, computed once per set of layers (a layer swap recomputes it)."""
    key = tuple(id(layer) for layer in field.layers)
    cached = field.__dict__.get("_fused_support")
    if cached is None or cached[0] != key:
        cached = (key, unsupported_reason(field))
        field.__dict__["_fused_support"] = cached
        if cached[1] is not None:
            warnings.warn(f"{type(field).__name__} runs layer by layer, not through the fused field op: "
                          f"{cached[1]}", RuntimeWarning, stacklevel=4)
    return cached[1]


_PER_LAYER = threading.local()


@contextlib.contextmanager
def per_layer() -> Iterator[None]:
    """Within this block sparse fields run layer by layer, as without the fused op (for comparing
    the two paths; this thread only)."""
    before = getattr(_PER_LAYER, "on", False)
    _PER_LAYER.on = True
    try:
        yield
    finally:
        _PER_LAYER.on = before


def _fused_devices() -> tuple[str, ...]:
    """Device types the op has kernels for: the CPU, and CUDA once sparseode.kernels.field_register
    has registered the Triton kernels (below, where triton is installed)."""
    from sparseode.kernels import field_register

    return ("cpu", "cuda") if "mlp_field" in field_register.registered() else ("cpu",)


def can_run(field: nn.Module, like: Tensor) -> bool:
    """True when the fused op runs ``field`` on states like ``like`` (CPU, or CUDA through the Triton
    kernels; float32/float64, the parameters' dtype); a field it cannot take warns once, saying why."""
    if getattr(_PER_LAYER, "on", False) or _structure_reason(field) is not None:
        return False
    param = next(field.parameters(), None)
    return (like.device.type in _fused_devices() and like.dtype in (torch.float32, torch.float64)
            and (param is None or (param.dtype == like.dtype and param.device == like.device)))


def fused_forward(field: nn.Module, t: Tensor | float, x: Tensor) -> Tensor | None:
    """``field(t, x)`` through the fused op for x (..., d) and one time t, or None where it cannot run."""
    if torch.as_tensor(t).numel() != 1 or x.dim() < 1 or not can_run(field, x):
        return None
    f, _ = fused_field(field, t, x.reshape(-1, field.dim))
    return f.reshape(x.shape)


def fused_trace(trace: str) -> Callable[[nn.Module, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]:
    """The CNF dynamics ``fn(field, t, x, noise) -> (dx (..., d), -trace (...,))`` through the fused op
    (callers check :func:`can_run` first); ``trace`` is ``"exact"`` or ``"hutchinson"``."""
    def dynamics(field: nn.Module, t: Tensor, x: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        d = field.dim
        probe = noise.reshape(-1, d) if trace == "hutchinson" else None
        f, term = fused_field(field, t, x.reshape(-1, d), trace, probe)
        return f.reshape(x.shape), -term.reshape(x.shape[:-1])

    return dynamics


# --- the pure-PyTorch truth of the op ---------------------------------------------------------------
def dense_weights(weights: list[Tensor], patterns: list[Tensor], d: int) -> list[Tensor]:
    """The op's weights as dense (N, K) matrices (differentiable in the stored values)."""
    dense, p, k = [], 0, d
    for w in weights:
        if w.dim() == 2:
            dense.append(w)
        else:
            crow, col = patterns[p], patterns[p + 1]
            rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow[1:] - crow[:-1])
            dense.append(w.new_zeros((crow.numel() - 1, k)).index_put((rows, col), w))
            p += _CSR_FIELDS
        k = dense[-1].shape[0]
    return dense


def mlp_field_reference(z: Tensor, probe: Optional[Tensor], weights: list[Tensor], patterns: list[Tensor],
                        scales: list, shifts: list, activation: str, trace: int) -> tuple[Tensor, Tensor]:
    """The op's (f, trace term) by plain dense layers and the autograd trace (vector-Jacobian
    products with ``create_graph``), differentiable everywhere: the truth the op is tested against."""
    act = ACTIVATIONS[activation]
    dense = dense_weights(weights, patterns, z.shape[1])
    with torch.enable_grad():
        x = z if z.requires_grad else z.detach().requires_grad_(True)
        h = x
        for i, w in enumerate(dense):
            h = h @ w.t()
            h = h * scales[i] if scales[i] is not None else h
            h = h + shifts[i] if shifts[i] is not None else h
            h = act(h) if i + 1 < len(dense) else h
        term = x.new_zeros(x.shape[0])
        if trace == 1:
            for i in range(x.shape[1]):
                (g,) = torch.autograd.grad(h[:, i].sum(), x, create_graph=True)
                term = term + g[:, i]
        elif trace == 2:
            (g,) = torch.autograd.grad(h, x, probe, create_graph=True)
            term = (g * probe).sum(-1)
    return h, term


if op_available()[0]:
    from sparseode.nn import fused_field_backward as _backward  # registers fake and autograd

    _backward.register()
    from sparseode.kernels import field_register  # Triton kernels as the op's CUDA kernels (loaded lazily)

    field_register.register()
