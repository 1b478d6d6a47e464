"""Per-call overhead of the sparse op path: a SparseLinear forward + backward at a tiny shape, where
the kernel itself costs almost nothing and what is timed is the Python and dispatcher work around it.

Rows (each checked against nn.Linear before it is timed, torch.utils.benchmark medians, one
thread): ``train`` = forward + backward of sum(layer(x)), ``forward`` = forward with autograd
recording (the call that builds the graph), ``inference`` = forward under no_grad. Columns: dense
nn.Linear, SparseLinear on each available backend, and ``cpu-pyautograd``: the C++ kernels with
the ops' autograd formulas registered from Python (sparseode/ops/library.py) over the C++ ones
(csrc/autograd_ops.cpp), the path every call took before the autograd moved to C++. ``switch``:
what one use_backend() enter and exit costs (registration work), which a layer pinned to another
backend paid per call before pinning called the backend's own ops. Each column is timed in
``--rounds`` alternating rounds; the table shows the minimum over rounds.

    OMP_NUM_THREADS=1 flock /tmp/sparseode-bench.lock python bench/op_overhead.py --rounds 3
    python bench/op_overhead.py --out 8 --inp 8 --batch 4 --format csr --json overhead.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils import benchmark

from sparseode.nn import SparseLinear
from sparseode.ops import library, use_backend
from sparseode.ops.handlers import FORMAT_HANDLERS

TASKS = ("train", "forward", "inference")
PY_AUTOGRAD = "cpu-pyautograd"


@contextlib.contextmanager
def python_autograd() -> Iterator[None]:
    """The ops' autograd formulas from Python (register_autograd) in front of the C++ ones, inside."""
    import warnings

    lib = torch.library.Library("sparseode", "FRAGMENT")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        for h in FORMAT_HANDLERS.values():
            library.register_autograd(h, library.OPS, lib=lib)
    try:
        yield
    finally:
        lib._destroy()


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
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the minimum is shown")
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
    columns = list(layers) + ([PY_AUTOGRAD] if "cpu" in layers else [])

    def timed_cell(task: str, column: str) -> float:
        if column == PY_AUTOGRAD:
            with python_autograd():
                check(layers["cpu"], dense, x)
                fn = task_fn(task, layers["cpu"], x)
                fn()
                return timed(fn, args.min_run_time)
        fn = task_fn(task, layers[column], x)
        fn()
        return timed(fn, args.min_run_time)

    def switch() -> None:
        with use_backend("torch", "cpu"):
            pass

    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for task in TASKS:
            for column in columns:
                t = timed_cell(task, column) * 1e6
                best[task, column] = min(best.get((task, column), t), t)
        t = timed(switch, args.min_run_time) * 1e6
        best["switch", ""] = min(best.get(("switch", ""), t), t)

    rows = []
    print(f"SparseLinear {args.out}x{args.inp}, batch {args.batch}, format {args.format}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); microseconds per call, "
          f"min of {args.rounds} round(s)")
    print(f"{'task':<10}" + "".join(f"{name:>16}" for name in columns))
    for task in TASKS:
        row = {"task": task, **{name: best[task, name] for name in columns}}
        rows.append(row)
        print(f"{task:<10}" + "".join(f"{row[name]:>16.1f}" for name in columns))
    print(f"use_backend switch (enter + exit): {best['switch', '']:.1f} us")
    rows.append({"task": "switch", "us": best["switch", ""]})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "us_per_call": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
