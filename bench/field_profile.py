"""Profile of the fused field op's forward (``sparseode::mlp_field``) on the CPU: where the time of
one field evaluation goes, and what bounds it.

For a pruned 2 -> hidden x3 -> 2 field (tanh, the hidden-to-hidden layers CSR at each density, the
2-wide first and last layers dense), batch B, with and without the exact trace (2 tangent
columns), every figure from one run:

* ``call``: the whole Python entry point (``field(t, x)`` / ``fused_field(..., "exact")``);
* ``op``: the op alone on prebuilt arguments; ``call - op`` is the per-call Python work
  (``field_arguments``: the op's argument lists, time terms) and ``args`` times that alone;
* ``op identity``: the same op with the identity activation: ``op - op identity`` is the time in the
  activation and its derivative (the tangents' act' scaling stays in both);
* ``op empty``: the op on the same field with empty hidden layers: everything but the sparse
  products (dense first/last layers, activations, packing, threads); ``op - op empty`` is the time
  of the sparse products, whose FLOPs (2 per stored weight per panel column) give the sparse
  GFLOP/s;
* ``floor``: the op at batch 1 with empty hidden layers (checks, allocation, dispatch);
* the parts of ``op empty``: ``shallow`` is the op on a 2 -> hidden -> 2 field with the identity
  (the dense first and last layers, input packing, the non-finite check, one bias pass; its GFLOP/s
  count the dense layers' products); ``(op empty identity - shallow) / 2`` is one empty hidden
  layer's row loop (bias, stores); ``op empty - op empty identity`` the activation of the 3 layers;
* reference rates from the same run: dense ``torch.mm`` of the hidden layer's shape on the same
  panel width (GFLOP/s the cores reach on dense work) and ``torch.tanh`` on the activations.

Memory: each tile's input panel is (hidden, PW) floats, PW = (1 + tangents) * TB, and the sparse
products read one panel row (PW floats) per stored weight; the script prints the panel size next to
the L1/L2 sizes and the panel bytes the products read per second.

    OMP_NUM_THREADS=2 python bench/field_profile.py                        # ~1 min, quiet machine
    SPARSEODE_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=2 python bench/field_profile.py
    OMP_NUM_THREADS=1 python bench/field_profile.py --clock thread         # on a loaded machine
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils import benchmark

import sparseode as so
from sparseode.models import MLPVectorField
from sparseode.nn import fused_field as ff
from sparseode.ops import extension


def make_fields(hidden: int, density: float, seed: int) -> tuple[nn.Module, nn.Module]:
    """(dense 2 -> hidden x3 -> 2 tanh field, the same field with its hidden-to-hidden layers pruned
    to ``density`` by magnitude and stored as CSR); the dense one has the pruned weights baked in."""
    torch.manual_seed(seed)
    dense = MLPVectorField(2, (hidden,) * 3, activation="tanh")
    for layer in dense.layers[1:-1]:
        prune.l1_unstructured(layer, "weight", amount=1.0 - density)
    sparse = so.sparsify(dense, format="csr", backend="cpu")
    for layer in dense.layers[1:-1]:
        prune.remove(layer, "weight")
    return dense, sparse


CLOCK = {"clock": "wall"}


def timed(fn, min_run_time: float) -> float:
    """Fastest block's seconds per ``fn()`` (the minimum resists other load on the machine better
    than the median, and the profile subtracts timings): wall time by torch.utils.benchmark, or with
    ``--clock thread`` this thread's CPU time (with one torch thread the op runs on it; time spent
    descheduled by other jobs is not counted)."""
    if CLOCK["clock"] == "wall":
        return min(benchmark.Timer("f()", globals={"f": fn}).blocked_autorange(min_run_time=min_run_time).times)
    fn()
    best, spent, n = float("inf"), 0.0, 10
    while spent < min_run_time:
        start = time.thread_time()
        for _ in range(n):
            fn()
        block = time.thread_time() - start
        spent += block
        best = min(best, block / n)
        if block < 1e-2:
            n *= 2
    return best


def timed_rounds(fns: dict, min_run_time: float, rounds: int) -> dict[str, float]:
    """``timed`` of every callable, interleaved over ``rounds`` rounds, the minimum of each."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn, min_run_time))
    return best


def _detached(args):
    weights, patterns, scales, shifts = args
    d = [w.detach() for w in weights]
    return d, patterns, [s if s is None else s.detach() for s in scales], [c if c is None else c.detach() for c in shifts]


def _emptied(field: nn.Module, hidden: tuple[int, ...] | None = None) -> nn.Module:
    """The field (or one of its width with ``hidden`` layers) with every CSR hidden layer holding no
    entries (same shapes)."""
    empty = MLPVectorField(field.dim, hidden or field.hidden, time=field.time, activation=field.activation)
    for layer in empty.layers[1:-1]:
        prune.custom_from_mask(layer, "weight", torch.zeros_like(layer.weight, dtype=torch.bool))
    return so.sparsify(empty, format="csr", backend="cpu")


def cache_sizes() -> dict[str, int]:
    """Per-core L1d and L2 bytes from sysfs (0 where unknown)."""
    sizes = {}
    for idx in range(4):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}")
        try:
            level, kind = (base / "level").read_text().strip(), (base / "type").read_text().strip()
            text = (base / "size").read_text().strip()
        except OSError:
            continue
        if kind in ("Data", "Unified"):
            sizes[f"L{level}"] = int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    return sizes


def tile_width(batch: int, hidden: int, tangents: int) -> int:
    """The op's tile width (field_cpu.cpp choose_tile) for float32 on this variant."""
    lanes = 16 if extension.cpu_capability() == "avx512" else 8
    per_thread = -(-batch // torch.get_num_threads())
    tb = lanes
    while tb < 4 * lanes and tb < per_thread and 2 * hidden * (1 + tangents) * (2 * tb) * 4 <= 256 * 1024:
        tb *= 2
    return tb


def profile(hidden: int, density: float, batch: int, trace: str | None, min_run_time: float,
            rounds: int) -> dict:
    dense, sparse = make_fields(hidden, density, 0)
    empty = _emptied(sparse)
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.5)
    code, m = ff.TRACE_CODES[trace], (2 if trace == "exact" else 0)
    op = torch.ops.sparseode.mlp_field
    with torch.no_grad():
        args = _detached(ff.field_arguments(sparse, t))
        args_empty = _detached(ff.field_arguments(empty, t))
        args_shallow = _detached(ff.field_arguments(_emptied(sparse, (hidden,)), t))
        want = dense(t, x)
        assert float((op(x, None, *args, "tanh", code, False)[0] - want).abs().max()) < 1e-4 * float(want.abs().max())
        r = dict(hidden=hidden, density=density, batch=batch, trace=trace or "none")
        call = (lambda: sparse(t, x)) if trace is None else (lambda: ff.fused_field(sparse, t, x, trace))
        x1 = x[:1].contiguous()
        r.update(timed_rounds({
            "dense": lambda: dense(t, x),
            "call": call,
            "args": lambda: ff.field_arguments(sparse, t),
            "op": lambda: op(x, None, *args, "tanh", code, False),
            "op_identity": lambda: op(x, None, *args, "identity", code, False),
            "op_empty": lambda: op(x, None, *args_empty, "tanh", code, False),
            "floor": lambda: op(x1, None, *args_empty, "identity", code, False),
            # the parts of op_empty: one hidden layer (the dense first and last layers only), and identity
            "shallow": lambda: op(x, None, *args_shallow, "identity", code, False),
            "shallow_tanh": lambda: op(x, None, *args_shallow, "tanh", code, False),
            "empty_identity": lambda: op(x, None, *args_empty, "identity", code, False),
        }, min_run_time, rounds))
        # reference rates: dense GEMM of one hidden layer on the panel width, tanh of the activations
        h = torch.randn(hidden, batch * (1 + m))
        w = torch.randn(hidden, hidden)
        r["gemm_gflops"] = 2 * hidden * hidden * h.shape[1] / timed(lambda: torch.mm(w, h), min_run_time) / 1e9
        acts = torch.randn(batch, hidden)
        r["torch_tanh_ns"] = timed(lambda: torch.tanh(acts), min_run_time) / acts.numel() * 1e9
    nnz = sum(int(layer.sparse.values.numel()) for layer in sparse.layers[1:-1])
    columns = batch * (1 + m)
    r["nnz"] = nnz
    r["sparse_gflops"] = 2 * nnz * columns / max(r["op"] - r["op_empty"], 1e-9) / 1e9
    r["act_share"] = (r["op"] - r["op_identity"]) / r["op"]
    r["sparse_share"] = (r["op"] - r["op_empty"]) / r["op"]
    r["python_share"] = (r["call"] - r["op"]) / r["call"]
    r["act_ns"] = (r["op"] - r["op_identity"]) / (3 * hidden * batch) * 1e9
    tb = tile_width(batch, hidden, m)
    r["tb"], r["panel_bytes"] = tb, hidden * (1 + m) * tb * 4
    # panel bytes the products read: one panel row (PW floats) per stored weight per tile
    r["panel_read_gbs"] = nnz * columns * 4 / max(r["op"] - r["op_empty"], 1e-9) / 1e9
    r["weight_bytes"] = nnz * (4 + 8)
    # op_empty = floor + dense first/last layers (with pack, non-finite check, one bias pass) + two
    # empty hidden layers' row loops + the activation of the three hidden layers
    r["part_dense"] = r["shallow"] - r["floor"]
    r["part_rows"] = (r["empty_identity"] - r["shallow"]) / 2
    r["part_act"] = r["op_empty"] - r["empty_identity"]
    r["part_act_first"] = r["shallow_tanh"] - r["shallow"]
    tangent_rows = 1 + (trace is not None)  # state and the trace's rows of the last layer's products
    dense_flops = 2 * 2 * hidden * batch * (1 + m) + 2 * hidden * 2 * batch * tangent_rows
    r["dense_gflops"] = dense_flops / max(r["part_dense"], 1e-9) / 1e9
    return r


def report(r: dict) -> str:
    ms = {k: r[k] * 1e3 for k in ("dense", "call", "op", "op_identity", "op_empty")}
    return "\n".join([
        f"2->{r['hidden']}x3 density {r['density']:g} batch {r['batch']} trace {r['trace']}: "
        f"dense {ms['dense']:.3f} ms, fused call {ms['call']:.3f} ms ({r['dense'] / r['call']:.2f}x dense)",
        f"  op {ms['op']:.3f} ms | op identity {ms['op_identity']:.3f} | op empty hidden {ms['op_empty']:.3f} | "
        f"args {r['args'] * 1e6:.0f} us | floor (B=1) {r['floor'] * 1e6:.0f} us",
        f"  sparse products: {r['sparse_share']:.0%} of the op, {r['sparse_gflops']:.1f} GFLOP/s "
        f"(dense torch.mm of the layer: {r['gemm_gflops']:.0f} GFLOP/s), panel reads {r['panel_read_gbs']:.0f} GB/s",
        f"  activation + derivative: {r['act_share']:.0%} of the op, {r['act_ns']:.2f} ns per element "
        f"(torch.tanh: {r['torch_tanh_ns']:.2f} ns)",
        f"  op empty hidden = fixed {r['floor'] * 1e6:.0f} us + dense 2-wide first/last layers, pack, non-finite "
        f"check {r['part_dense'] * 1e6:.0f} us ({r['dense_gflops']:.1f} GFLOP/s) + 2 x {r['part_rows'] * 1e6:.0f} us "
        f"per empty hidden layer (row loop, bias, stores) + activation of 3 layers {r['part_act'] * 1e6:.0f} us "
        f"(first layer alone {r['part_act_first'] * 1e6:.0f} us)",
        f"  Python per call (call - op): {r['python_share']:.0%} of the call",
        f"  tile TB={r['tb']}, input panel {r['panel_bytes'] / 1024:.0f} KiB per tile, "
        f"weights+indices {r['weight_bytes'] / 1024:.0f} KiB ({r['nnz']} stored)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--density", type=float, nargs="+", default=[0.1, 0.02])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the minimum of each is kept)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall time, or this thread's CPU time (needs OMP_NUM_THREADS=1; for a loaded machine)")
    args = parser.parse_args(argv)
    ok, why = ff.op_available()
    if not ok:
        print(f"the fused field op is unavailable: {why}", file=sys.stderr)
        return 1
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread measures one thread: run with OMP_NUM_THREADS=1")
    CLOCK["clock"] = args.clock
    caches = cache_sizes()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU variant {extension.cpu_capability()} "
          f"(SPARSEODE_CPU_CAPABILITY={os.environ.get('SPARSEODE_CPU_CAPABILITY', 'unset')}), float32, {args.clock} clock, "
          f"L1d {caches.get('L1', 0) // 1024} KiB, L2 {caches.get('L2', 0) // 1024} KiB per core")
    for density in args.density:
        for trace in (None, "exact"):
            print(report(profile(args.hidden, density, args.batch, trace, args.min_run_time, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
