"""End-to-end CNF solve benchmark (see sparseode/benchmark.py for the variants and tasks).

    python bench/e2e_solve.py                                   # toy64, wide256, power at batch 1000
    python bench/e2e_solve.py --fields toy64 wide256 wide1024 power --batch 1000 10000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from sparseode import benchmark


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=benchmark.__doc__.splitlines()[0])
    p.add_argument("--fields", nargs="+", choices=sorted(benchmark.FIELDS), default=["toy64", "wide256", "power"])
    p.add_argument("--density", type=float, nargs="+", default=[0.5, 0.1, 0.05, 0.02])
    p.add_argument("--batch", type=int, nargs="+", default=[1000])
    p.add_argument("--tasks", nargs="+", choices=benchmark.TASKS, default=list(benchmark.TASKS))
    p.add_argument("--steps", type=int, default=4, help="fixed rk4 steps per flow (NFE = 4 x steps)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--format", default="csr", choices=["csr", "bsr", "auto"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"rk4 x{args.steps}, exact trace, format {args.format}")
    print(benchmark.HEADER)
    rows = benchmark.run(args.fields, args.density, args.batch, args.tasks, args.steps, args.repeats, args.format,
                         args.backend, args.device, report=lambda r: print(benchmark.format_row(r), flush=True))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
