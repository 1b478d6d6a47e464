"""``format="auto"``: pick, per layer, the fastest of dense, CSR and BSR by timing them.

The choice is measured on the layer's own shape, mask and device with a representative batch, and
cached per device name (in memory and in a JSON file, ``$SPARSEODE_CACHE_DIR/formats.json``,
default ``~/.cache/sparseode``) so each case is timed once per machine. A case is the shape, the
density, the mask's structure (the kept share of the entries in the blocks BSR would store: 1 for a
block mask, about the density for an unstructured one), block size, batch, dtype and backend.
Sparse is chosen only when it beats dense: below the crossover density a layer stays dense. BSR is
not a candidate when its blocks would be mostly empty.

Timing makes the choice differ between processes until the cache holds it; a job whose processes
must agree (DDP) shares one process's choice (``sparseode.nn.convert.plan_formats``).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from sparseode.ops.formats import SparseWeight
from sparseode.ops.primitives import spmm
from sparseode.ops.select import resolve, use_backend

_MEMORY: dict[str, dict[str, str]] = {}


def device_name(device: torch.device) -> str:
    """A stable name of the processor behind ``device`` (the cache key of measured choices)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{torch.get_num_threads()}"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + f" x{torch.get_num_threads()}"


def _cache_file() -> Path:
    root = os.environ.get("SPARSEODE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparseode")
    return Path(root) / "formats.json"


def _cache(device: torch.device) -> dict[str, str]:
    name = device_name(device)
    if name not in _MEMORY:
        try:
            _MEMORY[name] = json.loads(_cache_file().read_text()).get(name, {})
        except (OSError, ValueError):
            _MEMORY[name] = {}
    return _MEMORY[name]


def _store(device: torch.device, key: str, choice: str) -> None:
    _cache(device)[key] = choice
    path = _cache_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[device_name(device)] = _cache(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs re-measuring in the next process


def _best_time(fn, reps: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def tiles(shape: tuple[int, ...], block: tuple[int, int]) -> bool:
    """True when (bh, bw) ``block`` tiles a weight of ``shape`` (out, in) exactly."""
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def bsr_storage(mask: Tensor, block: tuple[int, int]) -> tuple[int, int]:
    """(values BSR stores, kept weights) for the bool ``mask`` (out, in) in ``block`` blocks that
    tile it: a block is stored whole when any of its entries is kept."""
    bh, bw = block
    out_f, in_f = mask.shape
    touched = mask.reshape(out_f // bh, bh, in_f // bw, bw).any(dim=3).any(dim=1)
    return int(touched.sum()) * bh * bw, int(mask.sum())


def block_occupancy(mask: Tensor, block: tuple[int, int]) -> float:
    """Kept share of the entries BSR would store for ``mask`` (1.0 when nothing is stored)."""
    stored, kept = bsr_storage(mask, block)
    return kept / stored if stored else 1.0


def choose_format(weight: Tensor, mask: Tensor, backend: str = "auto", block: tuple[int, int] = (16, 16),
                  batch: int = 1024, min_bsr_occupancy: float = 0.5) -> str:
    """"dense", "csr" or "bsr": the fastest forward for ``weight`` (out, in) pruned by ``mask``.

    BSR is a candidate only when ``block`` tiles the weight and at least ``min_bsr_occupancy`` of
    the entries of the blocks it would store are kept. Timing uses a random (batch, in) input on
    the weight's device and dtype.
    """
    out_f, in_f = weight.shape
    density = float(mask.float().mean()) if mask.numel() else 0.0
    candidates = ["csr"]
    structure = "unstructured"
    if tiles(weight.shape, block):
        occupancy = block_occupancy(mask, block)
        structure = f"occ={occupancy:.2f}"
        if occupancy >= min_bsr_occupancy:
            candidates.append("bsr")
    key = (f"{out_f}x{in_f}|d={density:.2f}|{structure}|b={block[0]}x{block[1]}|B={batch}|{weight.dtype}|"
           f"{backend}|bsr>={min_bsr_occupancy:g}")
    cache = _cache(weight.device)
    if key in cache:
        return cache[key]
    x = torch.randn(batch, in_f, device=weight.device, dtype=weight.dtype)
    w = weight.detach() * mask
    with torch.no_grad():
        times = {"dense": _best_time(lambda: F.linear(x, w))}
        for fmt in candidates:
            sw = SparseWeight.from_dense(w, mask, format=fmt, block=block)
            with use_backend(resolve(backend, weight.device), weight.device.type):
                times[fmt] = _best_time(lambda: spmm(x, sw.values, sw.pattern))
    choice = min(times, key=times.get)
    _store(weight.device, key, choice)
    return choice
