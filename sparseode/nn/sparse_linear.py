"""``SparseLinear``: a drop-in for ``nn.Linear`` whose weight is stored sparse."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from sparseode.ops import dispatch, library, select
from sparseode.ops.formats import SparseWeight
from sparseode.pruned import effective, kept_mask


class SparseLinear(nn.Module):
    """y = act(x W^T + b) with W held in a :class:`SparseWeight` (masked, CSR or BSR).

    Same call as ``nn.Linear``: x (..., in_features) -> (..., out_features), any leading dims.
    ``weight`` is a read-only dense view; ``sparse.values`` (the stored weights) and ``bias`` are
    the parameters. ``activation`` (default identity) is fused into the kernel's epilogue.

    ``backend="auto"`` runs on the backend selected for the input's device
    (``sparseode.ops.set_backend`` / ``set_gpu_backend``; by default the compiled kernels, "cpu"
    on the CPU). Another name pins this layer to that backend at no cost per call: "torch" calls
    the pure-PyTorch reference (sparseode.ops.reference) and "triton" the Triton twins of the ops
    (``sparseode::triton_*``) directly, whatever the device's setting, forward and backward alike
    (an "auto" layer calls them too while that backend is selected for the device).
    One case still switches: a layer pinned to the compiled kernels ("cpu", "cuda") while another
    backend is selected for the device switches the setting around its forward (registration
    work, about a millisecond); its backward then runs on the backend selected when it runs.
    """

    def __init__(self, weight: SparseWeight, bias: Tensor | None = None, backend: str = "auto",
                 activation: str = "identity", from_pruned: bool = False) -> None:
        super().__init__()
        if activation not in library.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(library.ACTIVATIONS)}; got {activation!r}")
        if backend != "auto" and dispatch.status(backend).available:  # status: a clear error for an unknown name
            # look up now what a call looks up (lazy imports, the Triton twins), so that the
            # first call may be inside torch.compile
            be = dispatch.get(backend)
            for device_type in be.device_types:
                select.active(device_type)
            be.family()
        self.sparse = weight
        self.out_features, self.in_features = weight.shape
        if bias is None:
            self.register_parameter("bias", None)
        else:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone())
        self.backend = backend
        self.activation = activation
        # True when built from a layer pruned with torch.nn.utils.prune: densify restores the mask.
        self.from_pruned = from_pruned

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor | None = None, format: str = "csr",
                   backend: str = "auto", block: tuple[int, int] = (16, 16),
                   activation: str = "identity") -> "SparseLinear":
        """Sparse copy of ``linear``, keeping ``mask`` (bool, (out, in)).

        ``mask`` defaults to the layer's ``torch.nn.utils.prune`` mask when it has one, else to the
        nonzeros of its weight.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        pruned = kept_mask(linear)
        if mask is None:
            mask = pruned
        # weight_orig * weight_mask, not .weight: the latter is refreshed only by a forward call
        weight = SparseWeight.from_dense(effective(linear).detach(), mask, format=format, block=block)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(weight, bias, backend=backend, activation=activation, from_pruned=pruned is not None)

    @property
    def weight(self) -> Tensor:
        """Dense (out_features, in_features) view of the weight (read-only; zeros where pruned)."""
        return self.sparse.to_dense()

    @property
    def format(self) -> str:
        return self.sparse.format

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has shape {tuple(x.shape)}: expected (..., {self.in_features}) for a layer with "
                f"in_features={self.in_features}"
            )
        values = self._modules["sparse"]._parameters["values"]
        if x.dtype != values.dtype:
            raise TypeError(f"input has dtype {x.dtype} but the layer's weight has dtype {values.dtype}")
        if x.device != values.device:
            raise ValueError(f"input is on {x.device} but the layer's weight is on {values.device}")
        return self.fused_linear(x, self._parameters["bias"], self.activation)

    def _op(self, primitive: str, x: Tensor) -> Callable | None:
        """What this layer calls for ``primitive`` on ``x``'s device: its backend's own ops where
        it has them (the Triton twins, the reference functions: a compiled graph then holds the
        Triton kernels, not an opaque op), else the op itself when the layer's backend is the
        device's selected one ("auto", or pinned to it), else None: compiled kernels that another
        backend is switched in front of (the call then switches the device's setting)."""
        fmt = self._modules["sparse"].format
        if self.backend == "auto" and not select.switched(x.device.type):  # the default: the op itself
            return library.op(fmt, primitive)
        active = select.active(x.device.type)
        name = active if self.backend == "auto" else self.backend
        backend = dispatch.get(name)
        if name != active:
            backend.check(x)
        family = backend.family()
        if family is not None:
            return family[f"{fmt}_{primitive}"]
        return library.op(fmt, primitive) if name == active else None

    def fused_linear(self, z: Tensor, bias: Tensor | None, activation: str) -> Tensor:
        """act(z W^T + bias) in one kernel call, with a bias other than the layer's own (the vector
        fields fold their time term into it). z (..., in_features) -> (..., out_features)."""
        spmm = self._op("spmm", z)
        if spmm is None:
            with select.use_backend(self.backend, z.device.type):
                return self.fused_linear(z, bias, activation)
        sparse = self._modules["sparse"]
        if z.dim() == 2:
            return spmm(z, sparse._parameters["values"], *sparse.pattern, bias, activation)
        y = spmm(z.reshape(-1, self.in_features), sparse._parameters["values"], *sparse.pattern, bias, activation)
        return y.reshape(*z.shape[:-1], self.out_features)

    def fused_linear_fm(self, zT: Tensor, bias: Tensor | None, activation: str, act_cols: int) -> Tensor:
        """Feature-major: zT (in_features, B) -> (out_features, B) = W zT, with ``bias`` and
        ``activation`` on the first ``act_cols`` columns only (the vector fields keep their hidden
        states and tangent directions this way, so nothing is transposed between layers)."""
        spmm_fm = self._op("spmm_fm", zT)
        if spmm_fm is None:
            with select.use_backend(self.backend, zT.device.type):
                return self.fused_linear_fm(zT, bias, activation, act_cols)
        sparse = self._modules["sparse"]
        return spmm_fm(zT, sparse._parameters["values"], *sparse.pattern, bias, activation, act_cols)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same weight and bias (the activation is not carried)."""
        values = self.sparse.values
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=values.device, dtype=values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation != "identity" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend!r}{act}")
