"""Profile of one CNF training step through the fused field op on the CPU: where the time goes
(forward op calls, backward op calls, optimizer step, the rest: solver, Python, autograd), and inside
the backward op the share of its matrix products against its elementwise work.

For each field of issue 16's benchmark (``sparseode.fieldbench``: pruned hidden layers as CSR, tanh,
exact trace, fixed-step rk4 with ``--steps`` steps, batch ``--batch``) and density, from one run:

* ``A`` and ``sparse``: one training step (``-log_prob(x).mean()``, backward, Adam step) of the masked
  dense model with FFJORD's autograd trace and of the sparsified model through the fused op, and
  their ratio (the benchmark's ``train step vs A``);
* the step's parts, from ``torch.profiler`` over a few steps: the self time of
  ``sparseode::mlp_field`` (forward), ``sparseode::mlp_field_backward`` (backward), the Adam step,
  and the rest;
* the backward op alone on one evaluation's arguments (``bwd``), and on the same field with empty
  hidden layers (``bwd empty``: the elementwise work, the d-wide first and last layers, packing,
  accumulator sums); ``bwd - bwd empty`` is the hidden layers' two products (weight gradient and
  W^T adj), whose FLOPs (2 per stored weight per panel column each) give their GFLOP/s; the same
  for the forward op (``fwd``, ``fwd empty``), and dense ``torch.mm`` of a hidden layer on the whole
  panel as the rate the core reaches on dense work.

    OMP_NUM_THREADS=1 python bench/field_train_profile.py                 # ~1 min
    OMP_NUM_THREADS=2 python bench/field_train_profile.py --threads 2 --archs wide256 --densities 0.1
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.utils import prune
from torch.utils import benchmark

import sparseode as so
from sparseode.fieldbench.cases import build_case, hidden_linears
from sparseode.fieldbench.tasks import Inputs, Runner
from sparseode.models import MLPVectorField
from sparseode.nn import fused_field as ff

#: Profiler events of each part of a step: the ops' own and their autograd wrappers' self time (the
#: C++ kernel of the forward runs under the wrapper's label ``GeneratedBackwardFor_...``); the
#: backward op's and Adam's inclusive time (the backward's GEMM path calls ATen's mm inside it).
PARTS = {"forward": ("sparseode::mlp_field", "GeneratedBackwardFor_sparseode_mlp_field_default"),
         "backward": ("sparseode::mlp_field_backward", "GeneratedBackwardFor_sparseode_mlp_field_defaultBackward"),
         "adam": ("Optimizer.step#Adam.step",)}
INCLUSIVE = ("sparseode::mlp_field_backward", "Optimizer.step#Adam.step")


def timed(fn, min_run_time: float) -> float:
    """Median seconds per ``fn()`` (torch.utils.benchmark, at least ``min_run_time`` of calls)."""
    return benchmark.Timer("f()", globals={"f": fn}).blocked_autorange(min_run_time=min_run_time).median


def step_parts(runner: Runner, steps: int) -> dict[str, float]:
    """Seconds per training step in each of PARTS (self time) and in the rest, by torch.profiler."""
    runner.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.train()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    parts = {name: sum(e.cpu_time_total if e.key in INCLUSIVE else e.self_cpu_time_total
                       for e in events if e.key in keys) / 1e6 / steps
             for name, keys in PARTS.items()}
    parts["rest"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def _emptied(field: torch.nn.Module) -> torch.nn.Module:
    """The field with every hidden layer holding no entries (same shapes), as CSR."""
    empty = MLPVectorField(field.dim, field.hidden, time=field.time, activation=field.activation)
    for layer in hidden_linears(empty):
        prune.custom_from_mask(layer, "weight", torch.zeros_like(layer.weight, dtype=torch.bool))
    return so.sparsify(empty, format="csr", backend="cpu")


def op_times(field: torch.nn.Module, x: torch.Tensor, min_run_time: float) -> dict[str, float]:
    """Seconds of one forward op call (saving its products) and one backward op call on it (gradients
    of f and of the exact trace), on detached arguments."""
    t = torch.tensor(0.5)
    with torch.no_grad():
        weights, patterns, scales, shifts = ff.field_arguments(field, t)
        weights = [w.detach() for w in weights]
        shifts = [c if c is None else c.detach() for c in shifts]
        fwd = lambda: torch.ops.sparseode.mlp_field(x, None, weights, patterns, scales, shifts, "tanh", 1, True)
        f, term, saved = fwd()
        gen = torch.Generator().manual_seed(1)
        gf, gtr = torch.randn(f.shape, generator=gen), torch.randn(term.shape, generator=gen)
        bwd = lambda: torch.ops.sparseode.mlp_field_backward(x, None, weights, patterns, scales, shifts, saved, gf,
                                                            gtr, "tanh", 1)
        return {"fwd": timed(fwd, min_run_time), "bwd": timed(bwd, min_run_time)}


def profile(arch: str, density: float, batch: int, steps: int, min_run_time: float) -> dict:
    case = build_case(arch, density)
    inputs = Inputs.draw(batch, case.spec.dim)
    a, sparse = Runner(case, "dense", inputs, steps), Runner(case, "sparse", inputs, steps)
    r = {"arch": arch, "density": density, "batch": batch, "nfe": 4 * steps}
    r["A"], r["sparse"] = timed(a.train, min_run_time), timed(sparse.train, min_run_time)
    r["parts"] = step_parts(sparse, 3)
    field = sparse.fields[0]
    x = inputs.x
    ops, empty = op_times(field, x, min_run_time), op_times(_emptied(field), x, min_run_time)
    r.update(ops)
    r["fwd_empty"], r["bwd_empty"] = empty["fwd"], empty["bwd"]
    nnz = sum(int(layer.sparse.values.numel()) for layer in field.layers[1:-1])
    columns = batch * (1 + case.spec.dim)
    # None where the products' time is within the noise (the call no slower than the empty one)
    r["fwd_gflops"] = 2 * nnz * columns / (r["fwd"] - r["fwd_empty"]) / 1e9 if r["fwd"] > r["fwd_empty"] else None
    r["bwd_gflops"] = 2 * 2 * nnz * columns / (r["bwd"] - r["bwd_empty"]) / 1e9 if r["bwd"] > r["bwd_empty"] else None
    hidden = case.spec.hidden[0]
    w, panel = torch.randn(hidden, hidden), torch.randn(hidden, columns)
    r["gemm_gflops"] = 2 * hidden * hidden * columns / timed(lambda: torch.mm(w, panel), min_run_time) / 1e9
    return r


def _rate(gflops: float | None) -> str:
    return "within noise" if gflops is None else f"{gflops:.1f} GFLOP/s"


def report(r: dict) -> str:
    p, nfe = r["parts"], r["nfe"]
    share = {k: p[k] / p["total"] for k in ("forward", "backward", "adam", "rest")}
    return "\n".join([
        f"{r['arch']} density {r['density']:g} batch {r['batch']} (NFE {nfe}): train step A {r['A'] * 1e3:.1f} ms, "
        f"sparse {r['sparse'] * 1e3:.1f} ms ({r['A'] / r['sparse']:.2f}x vs A)",
        f"  step (profiler, {p['total'] * 1e3:.1f} ms): forward op {share['forward']:.0%}, backward op "
        f"{share['backward']:.0%}, Adam {share['adam']:.0%}, rest (solver, Python, autograd) {share['rest']:.0%}",
        f"  forward op {r['fwd'] * 1e3:.2f} ms per call (empty hidden layers {r['fwd_empty'] * 1e3:.2f} ms; "
        f"hidden products {_rate(r['fwd_gflops'])})",
        f"  backward op {r['bwd'] * 1e3:.2f} ms per call (empty hidden layers {r['bwd_empty'] * 1e3:.2f} ms = "
        f"elementwise, d-wide layers, sums; hidden products {_rate(r['bwd_gflops'])}, "
        f"{max(r['bwd'] - r['bwd_empty'], 0.0) / r['bwd']:.0%} of the call)",
        f"  dense torch.mm of one hidden layer on the whole panel: {r['gemm_gflops']:.0f} GFLOP/s",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["wide256", "toy64"], choices=["toy64", "wide256", "wide1024"])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1, 0.02])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4, help="rk4 steps (NFE = 4 x steps), as bench/field.py")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of calls per timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--batch, --steps and --threads must be positive")
    torch.set_num_threads(args.threads)
    ok, why = ff.op_available()
    if not ok:
        print(f"the fused field op is not available: {why}", file=sys.stderr)
        return 1
    print(f"# training-step profile, {args.threads} thread(s), torch {torch.__version__}, "
          f"CPU kernels {so.ops.extension.cpu_capability()}")
    for arch in args.archs:
        for density in args.densities:
            print(report(profile(arch, density, args.batch, args.steps, args.min_run_time)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
