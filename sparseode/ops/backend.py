"""The interface every backend implements, and the logic all of them share."""
from __future__ import annotations

from torch import Tensor

from sparseode.ops import reference


def _kept(values: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
    """BSR values with the pruned entries of partly kept blocks zeroed, so that the weight a kernel
    sees never depends on them (they hold zeros already when built by SparseWeight)."""
    return values * pattern[5] if fmt == "bsr" else values


class Backend:
    """A set of kernels for spmm, spmm_t and sddmm.

    Subclasses implement ``status`` and the ``_spmm``/``_spmm_t``/``_sddmm`` kernels for the
    formats in ``formats``; a format outside it runs on the reference (the ``masked`` format on the
    CPU, where a dense matmul *is* the right kernel). Shapes follow ops/reference.py.
    """

    name: str = ""
    formats: tuple[str, ...] = ()
    feature_major: bool = False  # has a feature-major spmm kernel (_spmm_fm)
    dtypes: tuple = ()
    device_types: tuple[str, ...] = ()

    def status(self) -> tuple[bool, str]:
        """(usable here, why not) — the reason is empty when usable."""
        raise NotImplementedError

    def check(self, t: Tensor) -> None:
        """Raise a clear error when this backend cannot take ``t``'s device or dtype."""
        if t.device.type not in self.device_types:
            raise ValueError(
                f"backend {self.name!r} runs on {', '.join(self.device_types)} tensors, got a tensor on {t.device}"
            )
        if t.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            raise TypeError(f"backend {self.name!r} supports dtypes {names}; got {t.dtype}")

    def spmm(self, x: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str,
             activation: str) -> Tensor:
        if fmt not in self.formats:
            return reference.spmm(x, values, pattern, bias, fmt, activation)
        return self._spmm(x, _kept(values, pattern, fmt), pattern, bias, fmt, activation)

    def spmm_fm(self, xT: Tensor, values: Tensor, pattern: list[Tensor], bias: Tensor | None, fmt: str,
                activation: str, act_cols: int) -> Tensor:
        """Feature-major spmm (see reference.spmm_fm): no autograd, for the inference path of fields
        kept feature-major. Backends without a feature-major kernel transpose around their spmm."""
        if fmt not in self.formats:
            return reference.spmm_fm(xT, values, pattern, bias, fmt, activation, act_cols)
        values = _kept(values, pattern, fmt)
        if self.feature_major:
            return self._spmm_fm(xT, values, pattern, bias, fmt, activation, act_cols)
        y = self._spmm(xT.t(), values, pattern, None, fmt, "identity").t()
        return reference.column_epilogue(y, bias, activation, act_cols)

    def spmm_t(self, g: Tensor, values: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
        if fmt not in self.formats:
            return reference.spmm_t(g, values, pattern, fmt)
        return self._spmm_t(g, _kept(values, pattern, fmt), pattern, fmt)

    def sddmm(self, a: Tensor, c: Tensor, pattern: list[Tensor], fmt: str) -> Tensor:
        if fmt not in self.formats:
            return reference.sddmm(a, c, pattern, fmt)
        out = self._sddmm(a, c, pattern, fmt)
        # Entries of a stored block that were pruned hold zeros and must get no gradient.
        if fmt == "bsr":
            out = out.masked_fill(~pattern[5], 0)
        elif fmt == "masked":
            out = out.masked_fill(~pattern[0], 0)
        return out

    def _spmm(self, x, values, pattern, bias, fmt, activation):  # pragma: no cover - interface
        raise NotImplementedError

    def _spmm_fm(self, xT, values, pattern, bias, fmt, activation, act_cols):  # pragma: no cover - interface
        raise NotImplementedError

    def _spmm_t(self, g, values, pattern, fmt):  # pragma: no cover - interface
        raise NotImplementedError

    def _sddmm(self, a, c, pattern, fmt):  # pragma: no cover - interface
        raise NotImplementedError


class TorchBackend(Backend):
    """The reference in plain PyTorch: every device, every floating dtype."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        self.device_types = ("cpu", "cuda", "meta")

    def status(self) -> tuple[bool, str]:
        return True, ""


TORCH = TorchBackend()
