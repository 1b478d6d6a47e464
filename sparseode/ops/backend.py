"""The interface every backend implements: whether it is usable here, which devices and dtypes it
takes, and the kernels it registers for the ops when it is switched in (sparseode.ops.select)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class Backend:
    """A set of kernels for the ops of sparseode.ops.library.

    ``formats`` lists the formats it has real kernels for (the others run on the reference);
    ``kernels()`` maps op names to Python kernels taking the ops' arguments, registered for a
    device's dispatch key while the backend is selected there. Compiled backends return none:
    their kernels are registered by sparseode._C itself and are the default.
    """

    name: str = ""
    formats: tuple[str, ...] = ()
    dtypes: tuple = ()
    device_types: tuple[str, ...] = ()

    def status(self) -> tuple[bool, str]:
        """(usable here, why not) — the reason is empty when usable."""
        raise NotImplementedError

    def kernels(self) -> dict[str, Callable]:
        return {}

    def family(self) -> dict[str, Callable] | None:
        """op name -> a callable taking the op's arguments, with its own autograd, that runs this
        backend whichever is selected for the device (a layer pinned to this backend calls it);
        None when the backend is reachable only through the ops' dispatch keys (compiled kernels)."""
        return None

    def check(self, t: Tensor) -> None:
        """Raise a clear error when this backend cannot take ``t``'s device or dtype."""
        if t.device.type not in self.device_types:
            raise ValueError(
                f"backend {self.name!r} runs on {', '.join(self.device_types)} tensors, got a tensor on {t.device}"
            )
        if t.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            raise TypeError(f"backend {self.name!r} supports dtypes {names}; got {t.dtype}")


class TorchBackend(Backend):
    """The reference in plain PyTorch: every device, every floating dtype, every format."""

    name = "torch"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    device_types = ("cpu", "cuda")

    @property
    def formats(self) -> tuple[str, ...]:  # type: ignore[override]
        from sparseode.ops.handlers import FORMAT_HANDLERS

        return tuple(FORMAT_HANDLERS)

    def status(self) -> tuple[bool, str]:
        return True, ""

    def kernels(self) -> dict[str, Callable]:
        from sparseode.ops import reference
        from sparseode.ops.handlers import FORMAT_HANDLERS

        return {name: fn for h in FORMAT_HANDLERS.values() for name, fn in reference.reference_kernels(h).items()}

    def family(self) -> dict[str, Callable]:
        # plain differentiable PyTorch: autograd records the reference itself. A plain dict filled
        # once, not functools.cache: torch.compile traces through this lookup.
        if not _REFERENCE_FAMILY:
            from sparseode.ops import reference
            from sparseode.ops.handlers import FORMAT_HANDLERS

            for h in FORMAT_HANDLERS.values():
                _REFERENCE_FAMILY.update(reference.reference_kernels(h))
        return _REFERENCE_FAMILY


_REFERENCE_FAMILY: dict[str, Callable] = {}


TORCH = TorchBackend()
