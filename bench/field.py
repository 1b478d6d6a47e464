"""Whole-field benchmark: a pruned MLP vector field through the fused field op against dense torch,
FFJORD-style dense CNF (A: nn.Linear layers, autograd trace) and today's per-layer sparse path.

Tasks, each row checked for values (training: loss and a gradient) against the dense model before
it is timed (torch.utils.benchmark, median of blocked runs):

* ``forward``: ``f(t, x)`` without grad;
* ``log_prob``: CNF log-likelihood, exact trace, rk4 with a fixed step (16 evaluations), no grad;
* ``train``: one training step (``-log_prob(x).mean()``, backward, Adam step), same solver.

The hidden-to-hidden layers are pruned to the density (magnitude, per layer) and stored as CSR;
the d-wide first and last layers stay dense. Ratios are reference time / method time from the
same run (> 1: faster).

    OMP_NUM_THREADS=2 python bench/field.py --json bench/results/field-cpu-2threads.json
    python bench/field.py --hidden 64 --density 0.1 --batch 1000
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils import benchmark

import sparseode as so
from sparseode.models import CNF, MLPVectorField
from sparseode.nn import fused_field as ff

RK4 = dict(method="rk4", options={"step_size": 0.25})  # 4 steps x 4 stages = 16 evaluations


def timed(fn, min_run_time: float) -> float:
    """Median seconds of ``fn()`` by torch.utils.benchmark."""
    return benchmark.Timer("f()", globals={"f": fn}).blocked_autorange(min_run_time=min_run_time).median


def _pruned(hidden: int, density: float, time, seed: int) -> tuple[nn.Module, list[nn.Linear]]:
    torch.manual_seed(seed)
    field = MLPVectorField(2, (hidden,) * 3, time=time, activation="tanh")
    linears = [m for n, m in field.named_modules() if isinstance(m, nn.Linear) and not n.endswith(("gate", "hyper_bias"))]
    for layer in linears[1:-1]:
        prune.l1_unstructured(layer, "weight", amount=1.0 - density)
    return field, linears[1:-1]


def make_fields(hidden: int, density: float, time, seed: int) -> tuple[nn.Module, nn.Module]:
    """(dense field with the pruned weights baked in, the same field sparsified to CSR)."""
    dense, pruned = _pruned(hidden, density, time, seed)
    for layer in pruned:
        prune.remove(layer, "weight")
    sparse = so.sparsify(_pruned(hidden, density, time, seed)[0], format="csr", backend="cpu")
    return dense, sparse


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = _rel(got, want)
    if not err < tol:
        raise SystemExit(f"{name}: values differ from the dense model (relative error {err:.2e} > {tol:g})")


def _loss(cnf: CNF, x: torch.Tensor, per_layer: bool) -> torch.Tensor:
    """The training loss, through the per-layer sparse path instead of the fused op if asked."""
    with ff.per_layer() if per_layer else contextlib.nullcontext():
        return -cnf.log_prob(x).mean()


def _train_step(cnf: CNF, opt: torch.optim.Optimizer, x: torch.Tensor, per_layer: bool):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = _loss(cnf, x, per_layer)
        loss.backward()
        opt.step()
        return loss

    return step


def _first_bias_grad(cnf: CNF, x: torch.Tensor, per_layer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cnf.zero_grad(set_to_none=True)
    loss = _loss(cnf, x, per_layer)
    loss.backward()
    layer = cnf.field.layers[0]
    bias = layer.bias if isinstance(layer, nn.Linear) else next(p for n, p in layer.named_parameters() if "bias" in n)
    return loss.detach(), bias.grad.clone()


def run_config(hidden: int, density: float, batch: int, time, min_run_time: float, seed: int) -> list[dict]:
    dense, sparse = make_fields(hidden, density, time, seed)
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(0.5)
    rows = []

    def row(task: str, method: str, seconds: float, ref: str) -> None:
        rows.append(dict(hidden=hidden, density=density, batch=batch, time=time, task=task, method=method,
                         ms=seconds * 1e3, reference=ref))

    # forward
    with torch.no_grad():
        want = dense(t, x)
        with ff.per_layer():
            _check("forward per-layer", sparse(t, x), want, 1e-5)
        _check("forward fused", sparse(t, x), want, 1e-5)
        row("forward", "dense", timed(lambda: dense(t, x), min_run_time), "dense")
        with ff.per_layer():
            row("forward", "per-layer", timed(lambda: sparse(t, x), min_run_time), "dense")
        row("forward", "fused", timed(lambda: sparse(t, x), min_run_time), "dense")
    # log_prob, exact trace
    cnf_a = CNF(dense, trace="exact", inference_trace="autograd", **RK4)
    cnf_s = CNF(sparse, trace="exact", **RK4)
    with torch.no_grad():
        want = cnf_a.log_prob(x)
        with ff.per_layer():
            _check("log_prob per-layer", cnf_s.log_prob(x), want, 1e-4)
        _check("log_prob fused", cnf_s.log_prob(x), want, 1e-4)
        row("log_prob", "A", timed(lambda: cnf_a.log_prob(x), min_run_time), "A")
        with ff.per_layer():
            row("log_prob", "per-layer", timed(lambda: cnf_s.log_prob(x), min_run_time), "A")
        row("log_prob", "fused", timed(lambda: cnf_s.log_prob(x), min_run_time), "A")
    # one training step
    loss_a, grad_a = _first_bias_grad(cnf_a, x, False)
    for method, per_layer in (("per-layer", True), ("fused", False)):
        loss, grad = _first_bias_grad(cnf_s, x, per_layer)
        _check(f"train loss {method}", loss, loss_a, 1e-4)
        _check(f"train gradient {method}", grad, grad_a, 1e-3)
    for method, cnf, per_layer in (("A", cnf_a, False), ("per-layer", cnf_s, True), ("fused", cnf_s, False)):
        opt = torch.optim.Adam(cnf.parameters(), lr=1e-6)
        row("train", method, timed(_train_step(cnf, opt, x, per_layer), min_run_time), "A")
    for r in rows:
        base = next(b["ms"] for b in rows if b["task"] == r["task"] and b["method"] in ("dense", "A"))
        r["speedup"] = base / r["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256], help="hidden width (3 layers)")
    parser.add_argument("--density", type=float, nargs="+", default=[0.1, 0.02], help="hidden-layer density")
    parser.add_argument("--batch", type=int, default=1000, help="batch size")
    parser.add_argument("--time", choices=["none", "concat", "concatsquash"], default="none", help="time mode")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    ok, why = ff.op_available()
    if not ok:
        print(f"the fused field op is unavailable: {why}", file=sys.stderr)
        return 1
    time = None if args.time == "none" else args.time
    rows = []
    for hidden in args.hidden:
        for density in args.density:
            rows += run_config(hidden, density, args.batch, time, args.min_run_time, args.seed)
            for r in rows[-9:]:
                print(f"2->{r['hidden']}x3 density {r['density']:<5g} {r['task']:<9} {r['method']:<10} "
                      f"{r['ms']:9.3f} ms  {r['speedup']:6.2f}x vs {r['reference']}", flush=True)
    if args.json:
        meta = dict(threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
                    processor=platform.processor(), argv=sys.argv[1:])
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
