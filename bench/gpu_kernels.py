"""GPU kernel benchmark: y = x W^T + b for a pruned W, ours against dense and torch.sparse.

Methods, each timed with ``triton.testing.do_bench`` (median) after its output is checked against a
float64 reference (a method whose error exceeds twice dense cuBLAS's at the same precision is
reported as failing and not timed):

  dense      cuBLAS, ``F.linear(x, W * mask, b)``
  torch_csr  ``W.to_sparse_csr() @ x^T`` (+ b), cuSPARSE (x^T made once, outside the timing)
  torch_bsr  ``W.to_sparse_bsr((32, 32)) @ x^T`` (+ b), block-structured rows only
  triton     sparseode's Triton kernels (backend "triton"), through the public op
  cuda       sparseode's CUDA kernels (backend "cuda", csrc/cuda), through the public op

Rows: hidden (N = K) x batch x density x structure (unstructured -> CSR, 32x32 blocks -> BSR) x
dtype; defaults are hidden 1024, 4096; batch 4096, 16384; densities 0.5, 0.2, 0.1, 0.05; float16 and
float32 (tf32 off unless --tf32). Prints a table of times and speedups over dense, names the device
and the torch/triton versions, and writes JSON and/or CSV (--json, --csv).

    python bench/gpu_kernels.py --json bench/results/gpu-h100.json --csv bench/results/gpu-h100.csv
    python bench/gpu_kernels.py --hidden 1024 --batch 4096 --dtypes float16 --dry-run
"""
from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from sparseode.benchmark import environment

METHODS: tuple[str, ...] = ("dense", "torch_csr", "torch_bsr", "triton", "cuda")
STRUCTURES: tuple[str, ...] = ("unstructured", "block32")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
BLOCK = (32, 32)


@dataclass(frozen=True)
class Config:
    """One problem: x (batch, hidden) times a (hidden, hidden) weight at ``density``."""

    hidden: int
    batch: int
    density: float
    structure: str
    dtype: str

    @property
    def format(self) -> str:
        return "csr" if self.structure == "unstructured" else "bsr"

    @property
    def label(self) -> str:
        return f"h{self.hidden} b{self.batch} d{self.density:g} {self.structure} {self.dtype}"


@dataclass
class Result:
    """One (config, method) measurement."""

    config: Config
    method: str
    status: str  # ok | dry-run | failed check | unsupported: ... | unavailable: ...
    time_ms: float | None = None
    speedup_vs_dense: float | None = None
    max_abs_error: float | None = None
    dense_max_abs_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        out = asdict(self.config)
        out.update({k: v for k, v in asdict(self).items() if k not in ("config", "extra")})
        out.update(self.extra)
        return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096], help="N = K of the weight")
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    p.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES))
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["float16", "float32"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--tf32", action="store_true", help="allow tf32 for float32 (dense and ours)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--csv", help="write the results as CSV here")
    p.add_argument("--dry-run", action="store_true", help="list the rows and exit (no GPU needed)")
    args = p.parse_args(argv)
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            p.error(f"densities must lie in (0, 1], got {d}")
    for h in args.hidden:
        if h <= 0 or h % BLOCK[0]:
            p.error(f"hidden sizes must be positive multiples of {BLOCK[0]} (the BSR block), got {h}")
    return args


def configs(args: argparse.Namespace) -> list[Config]:
    """Every row of the benchmark, in table order."""
    return [Config(h, b, d, s, t) for h, b, s, t, d in
            itertools.product(args.hidden, args.batch, args.structures, args.dtypes, args.densities)]


# --- problems and methods ------------------------------------------------------------------------
@dataclass
class Problem:
    x: Tensor  # (B, K)
    weight: Tensor  # (N, K), zeros where pruned
    mask: Tensor  # (N, K) bool
    bias: Tensor  # (N,)


def make_problem(cfg: Config, device: torch.device, gen: torch.Generator) -> Problem:
    n = k = cfg.hidden
    dtype = DTYPES[cfg.dtype]
    if cfg.structure == "unstructured":
        mask = torch.rand(n, k, generator=gen, device=device) < cfg.density
    else:
        blocks = torch.rand(n // BLOCK[0], k // BLOCK[1], generator=gen, device=device) < cfg.density
        mask = blocks.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
    scale = 1.0 / (cfg.density * k) ** 0.5  # keeps outputs O(1), so half precision does not overflow
    weight = torch.randn(n, k, generator=gen, device=device) * scale * mask
    x = torch.randn(cfg.batch, k, generator=gen, device=device)
    bias = torch.randn(n, generator=gen, device=device)
    return Problem(x.to(dtype), weight.to(dtype), mask, bias.to(dtype))


class Unsupported(Exception):
    """A method that cannot run this row (reason in the message)."""


def make_runner(method: str, cfg: Config, prob: Problem) -> tuple[Callable[[], Tensor], Callable[[Tensor], Tensor]]:
    """(fn, to_y): ``fn()`` is what gets timed; ``to_y(fn())`` is its (B, N) output for the check."""
    x, w, b = prob.x, prob.weight, prob.bias
    same = lambda y: y  # noqa: E731
    if method == "dense":
        return (lambda: F.linear(x, w, b)), same
    if method in ("torch_csr", "torch_bsr"):
        if method == "torch_bsr" and cfg.structure != "block32":
            raise Unsupported("unsupported: BSR baseline on block-structured rows only")
        try:
            ws = w.to_sparse_csr() if method == "torch_csr" else w.to_sparse_bsr(BLOCK)
        except (RuntimeError, NotImplementedError) as err:
            raise Unsupported(f"unsupported: {err}".splitlines()[0]) from None
        xt = x.t().contiguous()
        bcol = b[:, None]
        return (lambda: ws @ xt + bcol), (lambda y: y.t())
    from sparseode.ops import dispatch, set_gpu_backend, spmm
    from sparseode.ops.formats import SparseWeight

    st = dispatch.status(method)
    if not st.available:
        raise Unsupported(f"unavailable: {st.reason}")
    sw = SparseWeight.from_dense(w, prob.mask, format=cfg.format, block=BLOCK)
    values, pattern = sw.values.detach(), sw.pattern
    set_gpu_backend(method)  # the ops on CUDA tensors run on `method` until another row sets its own
    return (lambda: spmm(x, values, pattern, b)), same


def run_config(cfg: Config, methods: Sequence[str], args: argparse.Namespace, gen: torch.Generator) -> list[Result]:
    from triton.testing import do_bench

    prob = make_problem(cfg, torch.device("cuda"), gen)
    ref = F.linear(prob.x.double(), prob.weight.double(), prob.bias.double())
    dense_err = (F.linear(prob.x, prob.weight, prob.bias).double() - ref).abs().max().item()
    # Allowed error: twice dense's at this precision, or float32 rounding of the outputs, whichever is larger.
    allowed = max(2 * dense_err, 4 * torch.finfo(torch.float32).eps * ref.abs().max().item())
    results: list[Result] = []
    dense_ms = None
    for method in methods:
        res = Result(cfg, method, "ok", dense_max_abs_error=dense_err)
        try:
            fn, to_y = make_runner(method, cfg, prob)
            with torch.no_grad():
                y = to_y(fn())
            res.max_abs_error = (y.double() - ref).abs().max().item()
            if not res.max_abs_error <= allowed:
                res.status = "failed check"
            else:
                with torch.no_grad():
                    res.time_ms = float(do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))
        except Unsupported as why:
            res.status = str(why)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            res.status = f"unsupported: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        if method == "dense" and res.time_ms is not None:
            dense_ms = res.time_ms
        results.append(res)
    for res in results:
        if dense_ms is not None and res.time_ms:
            res.speedup_vs_dense = dense_ms / res.time_ms
    del prob, ref
    gc.collect()
    torch.cuda.empty_cache()
    return results


# --- output ---------------------------------------------------------------------------------------
def table(results: list[Result], methods: Sequence[str]) -> str:
    """Rows: configs; columns: each method's time in ms and, in brackets, its speedup over dense."""
    by_cfg: dict[Config, dict[str, Result]] = {}
    for r in results:
        by_cfg.setdefault(r.config, {})[r.method] = r
    head = f"{'row':<40}" + "".join(f"{m:>20}" for m in methods)
    lines = [head, "-" * len(head)]
    for cfg, per in by_cfg.items():
        cells = []
        for m in methods:
            r = per.get(m)
            if r is None:
                cells.append("")
            elif r.time_ms is not None:
                ratio = f" ({r.speedup_vs_dense:.2f}x)" if r.speedup_vs_dense else ""
                cells.append(f"{r.time_ms:.3f}ms{ratio}")
            else:
                cells.append(r.status.split(":")[0])
        lines.append(f"{cfg.label:<40}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def write(results: list[Result], env: dict[str, str], json_path: str | None, csv_path: str | None) -> None:
    rows = [r.flat() for r in results]
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"environment": env, "results": rows}, fh, indent=1)
    if csv_path:
        fields = list(rows[0]) if rows else ["hidden"]
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfgs = configs(args)
    env = environment()
    if args.dry_run:
        results = [Result(c, m, "dry-run") for c in cfgs for m in args.methods]
        print(f"dry run: {len(cfgs)} rows x {len(args.methods)} methods ({', '.join(args.methods)})")
        for c in cfgs:
            print(f"  {c.label} [{c.format}]")
        write(results, env, args.json, args.csv)
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --dry-run to list the rows", file=sys.stderr)
        return 2
    try:
        import triton.testing  # noqa: F401  (do_bench times every row)
    except ImportError:
        print("bench/gpu_kernels.py times with triton.testing.do_bench: install triton", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    print(f"device: {env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | triton {env['triton']} | "
          f"tf32 {'on' if args.tf32 else 'off'}")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    results: list[Result] = []
    for i, cfg in enumerate(cfgs):
        print(f"[{i + 1}/{len(cfgs)}] {cfg.label}", file=sys.stderr, flush=True)
        results += run_config(cfg, args.methods, args, gen)
    print(table(results, args.methods))
    write(results, env, args.json, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
