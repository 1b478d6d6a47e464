"""``format="auto"``: pick, per layer, the fastest of dense, CSR and BSR by timing them.

The choice is measured on the layer's own shape, mask and device with a representative batch, and
cached per device name (in memory and in a JSON file, ``$SPARSEODE_CACHE_DIR/formats.json``,
default ``~/.cache/sparseode``) so each shape/density is timed once per machine. Sparse is chosen
only when it beats dense: below the crossover density a layer stays dense.
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

from sparseode.ops import dispatch
from sparseode.ops.formats import SparseWeight

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


def choose_format(weight: Tensor, mask: Tensor, backend: str = "auto", block: tuple[int, int] = (16, 16),
                  batch: int = 1024) -> str:
    """"dense", "csr" or "bsr": the fastest forward for ``weight`` (out, in) pruned by ``mask``.

    BSR is a candidate only when ``block`` tiles the weight. Timing uses a random (batch, in) input
    on the weight's device and dtype.
    """
    out_f, in_f = weight.shape
    density = float(mask.float().mean()) if mask.numel() else 0.0
    candidates = ["csr"]
    if out_f % block[0] == 0 and in_f % block[1] == 0:
        candidates.append("bsr")
    key = f"{out_f}x{in_f}|d={density:.2f}|b={block[0]}x{block[1]}|B={batch}|{weight.dtype}|{backend}"
    cache = _cache(weight.device)
    if key in cache:
        return cache[key]
    x = torch.randn(batch, in_f, device=weight.device, dtype=weight.dtype)
    w = weight.detach() * mask
    with torch.no_grad():
        times = {"dense": _best_time(lambda: F.linear(x, w))}
        for fmt in candidates:
            sw = SparseWeight.from_dense(w, mask, format=fmt, block=block)
            be = dispatch.get(dispatch.resolve(backend, weight.device, fmt))
            times[fmt] = _best_time(lambda: be.spmm(x, sw.values, sw.pattern, None, fmt, "identity"))
    choice = min(times, key=times.get)
    _store(weight.device, key, choice)
    return choice
