"""Per-call overhead of the sparse op path: a SparseLinear forward + backward at a tiny shape, where
the kernel itself costs almost nothing and what is timed is the Python and dispatcher work around it.

Rows (each checked against nn.Linear before it is timed, torch.utils.benchmark medians, one
thread): ``train`` = forward + backward of sum(layer(x)), ``forward`` = forward with autograd
recording (the call that builds the graph), ``inference`` = forward under no_grad. Columns: dense
nn.Linear, and SparseLinear on each available backend.

    OMP_NUM_THREADS=1 flock /tmp/sparseode-bench.lock python bench/op_overhead.py
    python bench/op_overhead.py --out 8 --inp 8 --batch 4 --format csr --json overhead.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch
from torch import nn
from torch.utils import benchmark

from sparseode.nn import SparseLinear

TASKS = ("train", "forward", "inference")


def timed(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds of ``fn()``, by torch.utils.benchmark."""
    return benchmark.Timer("f()", globals={"f": fn}).blocked_autorange(min_run_time=min_run_time).median


def task_fn(task: str, layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    if task == "train":
        def step() -> None:
            layer(x).sum().backward()
        return step
    if task == "forward":
        return lambda: layer(x)

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)
    return infer


def check(layer: nn.Module, dense: nn.Linear, x: torch.Tensor) -> None:
    """The sparse layer's output and input gradient equal the dense layer's."""
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = layer(xs), dense(xd)
    ys.sum().backward()
    yd.sum().backward()
    torch.testing.assert_close(ys, yd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad, xd.grad, atol=1e-5, rtol=1e-5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=8)
    parser.add_argument("--inp", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--format", default="csr", choices=("masked", "csr", "bsr"))
    parser.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(args.inp, args.out)
    mask = torch.rand(args.out, args.inp, generator=gen) < args.density
    with torch.no_grad():
        dense.weight.mul_(mask)
    x = torch.randn(args.batch, args.inp, generator=gen)
    block = (1, 1) if args.format != "bsr" else (2, 2)
    layers: dict[str, nn.Module] = {"dense": dense}
    for backend in args.backends:
        layer = SparseLinear.from_dense(dense, mask, format=args.format, backend=backend, block=block)
        check(layer, dense, x)
        layers[backend] = layer

    rows = []
    print(f"SparseLinear {args.out}x{args.inp}, batch {args.batch}, format {args.format}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); microseconds per call")
    print(f"{'task':<10}" + "".join(f"{name:>12}" for name in layers))
    for task in TASKS:
        row = {"task": task}
        for name, layer in layers.items():
            fn = task_fn(task, layer, x)
            fn()
            row[name] = timed(fn, args.min_run_time) * 1e6
        rows.append(row)
        print(f"{task:<10}" + "".join(f"{row[name]:>12.1f}" for name in layers))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "us_per_call": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
