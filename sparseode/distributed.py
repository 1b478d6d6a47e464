"""Data-parallel runs under ``torchrun``: the process group, shards, and rank-0 decisions.

Launch any script (or ``sparseode train``/``prune``) with ``torchrun --nproc_per_node N ...``;
:func:`init` starts the process group from torchrun's environment (``gloo`` on CPU, ``nccl`` on
CUDA, chosen from the device), and :func:`sparseode.train.fit` / :func:`sparseode.prune.iterative`
then train with ``DistributedDataParallel``. Without a process group every helper here is a
no-op for one process, so the same code runs in a single process unchanged.

What runs where:

* every rank trains on its shard of each global batch (:func:`shard`) and DDP all-reduces the
  gradients of every trainable parameter (dense weights, ``weight_orig`` of a masked layer,
  ``values`` of a ``SparseLinear``);
* pruning decisions (masks, ``sparsify(format="auto")``'s formats: :func:`sparsify`) are taken
  on rank 0 and broadcast (:func:`broadcast_masks`, :func:`broadcast_object`), then checked
  (:func:`check_same_masks`);
* data-driven importance scores and the ICP measures are computed on the ranks' shards of the
  scoring batches / probe set inside :func:`collective` and combined there
  (:func:`mean_over_ranks`, :func:`gather_rows`), so they equal the single-process values over
  the whole set;
* progress bars, logs, JSON records and checkpoints are written by rank 0 only (:func:`is_main`).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "init", "shutdown", "is_distributed", "rank", "world_size", "is_main", "backend_for", "shard",
    "check_divides", "model_fingerprint", "tensor_bytes", "check_same", "check_same_model",
    "broadcast_object", "broadcast_masks", "check_same_masks", "collective", "mean_over_ranks", "gather_rows",
    "sum_over_ranks", "any_rank", "barrier", "sparsify",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than zero ranks."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes files, logs and progress bars."""
    return rank() == 0


def backend_for(device: torch.device | str | None) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device | str | None = None, timeout_s: float = 300.0) -> bool:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment).

    The backend follows ``device`` (:func:`backend_for`); on CUDA the process uses the GPU of its
    ``LOCAL_RANK``. Collectives that wait longer than ``timeout_s`` fail instead of hanging.
    Returns True when a process group is active (already, or started here).
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown(wait: bool = True) -> None:
    """Leave the process group (no-op without one); with ``wait``, once every rank has reached it.

    The barrier matters on a normal exit: a rank that tears gloo down while another still has
    traffic in flight can abort the other in gloo's threads ("terminate called without an active
    exception", seen under load). A rank leaving on an error passes ``wait=False``, so that it
    exits at once and torchrun stops the others instead of this rank waiting for them.
    """
    if is_distributed():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shard(n: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous share of ``n`` items (sizes differ by at most one)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def check_divides(batch_size: int, name: str = "batch_size") -> None:
    """Raise ValueError unless the world size divides the global ``batch_size``."""
    w = world_size()
    if batch_size % w:
        raise ValueError(f"the world size {w} does not divide {name}={batch_size}: every rank needs the same "
                         f"share of a global batch (use a multiple of {w})")


# -- agreement ---------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of ``model``'s parameters and buffers."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor's values (any dtype, 0-d included), for hashing."""
    return t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same(what: str, value: Any) -> None:
    """Raise RuntimeError on every rank unless all ranks hold the same ``value`` (a picklable
    description, e.g. a fingerprint), naming the ranks that differ from rank 0."""
    if not is_distributed():
        return
    values = _gather(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise RuntimeError(f"ranks disagree on {what}: rank(s) {bad} differ from rank 0 "
                           f"({values[bad[0]]!r} vs {values[0]!r})")


def check_same_model(model: nn.Module, when: str) -> None:
    """RuntimeError on every rank unless all ranks hold the same model (:func:`model_fingerprint`)."""
    if is_distributed():
        check_same(f"the model {when} (a hash of parameter names, shapes and values)", model_fingerprint(model))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mask_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    from sparseode.pruned import masks

    return sorted(masks(model).items())


def broadcast_masks(model: nn.Module) -> None:
    """Overwrite every rank's pruning masks (``*_mask`` buffers) with rank 0's, in place."""
    if not is_distributed():
        return
    check_same("the pruned tensors", [n for n, _ in _mask_buffers(model)])
    for _, buf in _mask_buffers(model):
        dist.broadcast(buf.data, src=0)


def _pattern_digest(model: nn.Module) -> str:
    # a model can hold a SparseLinear only once its module is imported: do not import the kernels here
    sparse_linear = sys.modules.get("sparseode.nn.sparse_linear")
    h = hashlib.sha256()
    for name, buf in _mask_buffers(model):
        h.update(name.encode())
        h.update(buf.detach().to("cpu", torch.bool).contiguous().numpy().tobytes())
    for name, mod in model.named_modules():
        if sparse_linear is not None and isinstance(mod, sparse_linear.SparseLinear):
            h.update(f"{name}:{type(mod.weight).__name__}".encode())
            for bname, b in mod.named_buffers():
                h.update(bname.encode())
                h.update(tensor_bytes(b))
    return h.hexdigest()


def check_same_masks(model: nn.Module, when: str = "") -> None:
    """Assert that every rank holds the same masks and sparse patterns (RuntimeError if not)."""
    if is_distributed():
        check_same(f"the pruning pattern{' ' + when if when else ''}", _pattern_digest(model))


# -- reductions --------------------------------------------------------------------------------
_COLLECTIVE = [False]


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """Inside this block :func:`mean_over_ranks` reduces over the ranks (every rank must call the
    same measures on its own shard); outside it, it is the mean of this process's values."""
    old = _COLLECTIVE[0]
    _COLLECTIVE[0] = is_distributed()
    try:
        yield
    finally:
        _COLLECTIVE[0] = old


def mean_over_ranks(sums: Sequence[Tensor], count: int) -> list[Tensor]:
    """``sums[i] / count`` in one process; inside :func:`collective`, ``Σ_ranks sums[i] / Σ_ranks
    count``: the mean over every rank's batches (``sums`` are per-rank sums over ``count`` batches)."""
    if not _COLLECTIVE[0] or not sums:
        return [s / count for s in sums]
    reduced, total = sum_over_ranks(sums, count)
    return [s / total for s in reduced]


def gather_rows(rows: Tensor) -> Tensor:
    """``rows`` ``(n, ...)`` in one process; inside :func:`collective`, every rank's rows stacked in
    rank order ``(Σ n, ...)`` (with contiguous shards, the single-process order)."""
    if not _COLLECTIVE[0]:
        return rows
    parts = _gather(rows.detach().to("cpu"))
    return torch.cat(parts).to(rows.device)


def sum_over_ranks(tensors: Sequence[Tensor], count: float = 0.0) -> tuple[list[Tensor], float]:
    """Element-wise sums over the ranks of ``tensors`` (any shapes, one dtype and device) and of
    ``count``, in one all-reduce."""
    if not is_distributed():
        return list(tensors), count
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]
                     + [torch.tensor([float(count)], dtype=torch.float64, device=_dev(tensors))])
    dist.all_reduce(flat)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(t.shape).to(t.dtype))
        i += t.numel()
    return out, float(flat[-1])


def _dev(tensors: Sequence[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def sparsify(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``sparseode.sparsify(model, **kwargs)`` that builds the same model on every rank: the
    per-layer formats (``format="auto"`` times the layers, so ranks and thread counts differ)
    are planned on rank 0 (:func:`sparseode.nn.convert.plan_formats`), broadcast, and every rank
    converts with them; the resulting patterns are checked equal."""
    from sparseode.nn.convert import plan_formats
    from sparseode.nn.convert import sparsify as convert

    if not is_distributed():
        return convert(model, **kwargs)
    if kwargs.get("formats") is not None:
        raise TypeError("distributed.sparsify plans the formats itself; call sparseode.sparsify with formats=")
    plan_kw = {k: v for k, v in kwargs.items() if k not in ("inplace", "formats")}
    formats = broadcast_object(plan_formats(model, **plan_kw) if is_main() else None)
    out = convert(model, formats=formats, **kwargs)
    check_same_masks(out, "after sparsify")
    return out
