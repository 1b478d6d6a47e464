"""CPU kernel benchmark: y = x W^T + b for a pruned W, ours against dense torch and torch.sparse CSR.

Each row is checked against the dense product before it is timed (torch.utils.benchmark,
median of blocked runs, forward only, no grad). Ratios are dense time / method time measured in
the same run (> 1: faster than dense). Structures: ``unstructured`` (ours: CSR) and
``block16`` (16x16 blocks kept or dropped whole; ours: BSR).

    python bench/cpu_kernels.py                       # the full grid of issue 3
    python bench/cpu_kernels.py --hidden 256 --batch 1024 --density 0.1 0.02
    python bench/cpu_kernels.py --json bench/results/cpu.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from typing import Sequence

import torch
from torch.nn import functional as F
from torch.utils import benchmark

from sparseode.nn import SparseLinear
from sparseode.ops import SparseWeight

STRUCTURES = {"unstructured": ("csr", (1, 1)), "block16": ("bsr", (16, 16))}


def make_mask(hidden: int, density: float, block: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    bh, bw = block
    kept = torch.rand(hidden // bh, hidden // bw, generator=gen) < density
    return kept.repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def timed(stmt, min_run_time: float) -> float:
    """Median seconds of ``stmt()`` (a callable), by torch.utils.benchmark."""
    return benchmark.Timer("f()", globals={"f": stmt}).blocked_autorange(min_run_time=min_run_time).median


def make_case(batch: int, hidden: int, density: float, structure: str, gen: torch.Generator):
    """One case's operands: w (hidden, hidden) masked dense float32, b (hidden,), x (batch, hidden),
    the SparseLinear of w on the CPU kernels and w as torch.sparse CSR."""
    fmt, block = STRUCTURES[structure]
    mask = make_mask(hidden, density, block, gen)
    w = torch.randn(hidden, hidden, generator=gen) * mask
    b = torch.randn(hidden, generator=gen)
    x = torch.randn(batch, hidden, generator=gen)
    layer = SparseLinear(SparseWeight.from_dense(w, mask, format=fmt, block=block), b, backend="cpu")
    return w, b, x, layer, w.to_sparse_csr()


def run_row(batch: int, hidden: int, density: float, structure: str, min_run_time: float,
            gen: torch.Generator) -> dict:
    w, b, x, layer, w_csr = make_case(batch, hidden, density, structure, gen)
    with torch.no_grad():
        want = F.linear(x, w, b)
        got = layer(x)
        torch_sparse = torch.sparse.mm(w_csr, x.t()).t() + b
        for name, out in (("ours", got), ("torch.sparse", torch_sparse)):
            if not torch.allclose(out, want, atol=1e-3, rtol=1e-4):
                raise AssertionError(f"{name} differs from dense at batch {batch} hidden {hidden} density {density}")
        t_dense = timed(lambda: F.linear(x, w, b), min_run_time)
        t_torch = timed(lambda: torch.sparse.mm(w_csr, x.t()).t() + b, min_run_time)
        t_ours = timed(lambda: layer(x), min_run_time)
    return {"batch": batch, "hidden": hidden, "density": density, "structure": structure, "format": layer.format,
            "dense_ms": t_dense * 1e3, "torch_csr_ms": t_torch * 1e3, "ours_ms": t_ours * 1e3,
            "ours_speedup": t_dense / t_ours, "torch_csr_speedup": t_dense / t_torch}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--density", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--structure", nargs="+", choices=sorted(STRUCTURES), default=["unstructured", "block16"])
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per method and row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32, forward, no grad")
    header = f"{'batch':>6} {'hidden':>6} {'density':>7} {'structure':>12} {'dense ms':>9} {'torch.sparse':>12} " \
             f"{'ours ms':>8} {'ours/dense':>10} {'torch.sparse/dense':>18}"
    print(header)
    rows = []
    for batch, hidden, density, structure in itertools.product(args.batch, args.hidden, args.density, args.structure):
        row = run_row(batch, hidden, density, structure, args.min_run_time, gen)
        rows.append(row)
        print(f"{batch:>6} {hidden:>6} {density:>7.2f} {structure:>12} {row['dense_ms']:>9.3f} "
              f"{row['torch_csr_ms']:>12.3f} {row['ours_ms']:>8.3f} {row['ours_speedup']:>9.2f}x "
              f"{row['torch_csr_speedup']:>17.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
