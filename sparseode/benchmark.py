"""End-to-end solve benchmark: wall time of CNF solves for dense, masked-dense and sparsified fields.

Variants (same field weights, same solver, equal NFE by construction: a fixed-step solver):

  A       dense nn.Linear field, FFJORD-style autograd trace (what users have today)
  masked  the pruned field as torch.nn.utils.prune leaves it (masked dense), autograd trace
  B       dense weights with this product's forward-mode trace (isolates what sparsity adds)
  sparse  ``sparsify``'d field (sparse kernels, fused epilogue) with the forward-mode trace

Tasks: ``log_prob`` (exact trace), ``sample`` (no trace) and one training step (NLL backward,
autograd trace; B uses the dense model there). Speedups are A/variant from one run, printed next
to the FLOP ratio of the field's matmuls (dense / kept weights: the ceiling of what sparsity buys).
"""
from __future__ import annotations

import itertools
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparseode.models import CNF, MLPVectorField
from sparseode.nn.convert import sparsify


@dataclass(frozen=True)
class FieldSpec:
    """A benchmarked field: dim, hidden widths, time mode and the number of stacked flows."""

    name: str
    dim: int
    hidden: tuple[int, ...]
    time: str | None = None
    flows: int = 1


FIELDS = {
    "toy64": FieldSpec("toy64", 2, (64, 64, 64)),
    "wide256": FieldSpec("wide256", 2, (256, 256, 256)),
    "wide1024": FieldSpec("wide1024", 2, (1024, 1024, 1024)),
    "power": FieldSpec("power", 6, (60, 60, 60), "concatsquash", 5),
}
VARIANTS = ("A", "masked", "B", "sparse")
TASKS = ("log_prob", "sample", "train_step")


def environment() -> dict[str, str]:
    """Versions of torch, CUDA, Python and triton, and the GPU's name where there is one (for results files)."""
    env = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def _prunable(field: nn.Module):
    for name, module in field.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(("gate", "hyper_bias")):
            yield module


def make_fields(spec: FieldSpec, density: float, seed: int = 0) -> tuple[list[nn.Module], list[nn.Module]]:
    """(dense fields, pruned fields) with the same initial weights; the pruned ones keep the
    largest-magnitude ``density`` share of every prunable layer (torch.nn.utils.prune masks)."""
    dense, pruned = [], []
    for k in range(spec.flows):
        torch.manual_seed(seed + k)
        dense.append(MLPVectorField(spec.dim, spec.hidden, time=spec.time, activation="tanh"))
        torch.manual_seed(seed + k)
        field = MLPVectorField(spec.dim, spec.hidden, time=spec.time, activation="tanh")
        for layer in _prunable(field):
            torch_prune.l1_unstructured(layer, "weight", amount=1.0 - density)
        pruned.append(field)
    return dense, pruned


def flop_ratio(fields: Sequence[nn.Module]) -> float:
    """Dense multiply-adds of the prunable layers over their kept weights."""
    total = kept = 0
    for field in fields:
        for layer in _prunable(field):
            total += layer.weight.numel()
            kept += int(layer.weight_mask.sum()) if hasattr(layer, "weight_mask") else layer.weight.numel()
    return total / max(kept, 1)


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (first-call allocation, format choice caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def task_fn(cnf: CNF, task: str, x: torch.Tensor) -> Callable[[], Any]:
    """A closure running one ``task`` of ``cnf`` on ``x`` (B, d): "log_prob" and "sample" without
    grad, "train_step" the loss -mean(log_prob) and its backward (gradients accumulate)."""
    if task == "log_prob":
        def run():
            with torch.no_grad():
                return cnf.log_prob(x)
    elif task == "sample":
        def run():
            with torch.no_grad():
                return cnf.sample(x.shape[0])
    else:
        def run():
            loss = -cnf.log_prob(x).mean()
            loss.backward()
            return loss
    return run


def run(fields: Sequence[str] = ("toy64", "wide256", "power"), densities: Sequence[float] = (0.5, 0.1, 0.05, 0.02),
        batches: Sequence[int] = (1000,), tasks: Sequence[str] = TASKS, steps: int = 4, repeats: int = 2,
        fmt: str = "csr", backend: str = "auto", device: str = "cpu", seed: int = 0,
        report: Callable[[dict], None] | None = None) -> list[dict]:
    """Time every (field, density, batch, task) for the four variants; returns one dict per row
    (times in ms, speedups over A and B, FLOP ratio, NFE), calling ``report(row)`` as rows finish."""
    options = {"step_size": 1.0 / steps}
    rows = []
    for name, density, batch in itertools.product(fields, densities, batches):
        spec = FIELDS[name]
        dense, pruned = make_fields(spec, density, seed)
        sparse_fields = [sparsify(prune_copy, format=fmt, backend=backend)
                         for prune_copy in make_fields(spec, density, seed)[1]]
        kwargs = dict(trace="exact", method="rk4", options=options)
        cnfs = {
            "A": CNF(dense, inference_trace="autograd", **kwargs),
            "masked": CNF(pruned, inference_trace="autograd", **kwargs),
            "B": CNF(dense, **kwargs),
            "sparse": CNF(sparse_fields, **kwargs),
        }
        for cnf in cnfs.values():
            cnf.to(device)
        x = torch.randn(batch, spec.dim, device=device, generator=None)
        with torch.no_grad():
            want = cnfs["masked"].log_prob(x)
            got = cnfs["sparse"].log_prob(x)
        rel = float(((got - want).abs() / want.abs().clamp_min(1e-6)).max())
        for task in tasks:
            times, nfe = {}, {}
            for variant in VARIANTS:
                if task == "train_step" and variant == "B":
                    continue  # training always differentiates through the autograd trace
                cnf = cnfs[variant]
                times[variant] = _time(task_fn(cnf, task, x), repeats) * 1e3
                nfe[variant] = cnf.nfe
            row = {"field": name, "density": density, "batch": batch, "task": task, "nfe": nfe["sparse"],
                   "equal_nfe": len(set(nfe.values())) == 1, "flop_ratio": flop_ratio(pruned),
                   "max_rel_diff": rel, **{f"{v}_ms": t for v, t in times.items()},
                   "sparse_vs_A": times["A"] / times["sparse"], "masked_vs_A": times["A"] / times["masked"]}
            if "B" in times:
                row["sparse_vs_B"] = times["B"] / times["sparse"]
            rows.append(row)
            if report is not None:
                report(row)
    return rows


def format_row(row: dict) -> str:
    b = f"{row['B_ms']:>9.1f}" if "B_ms" in row else f"{'-':>9}"
    vs_b = f"{row['sparse_vs_B']:>6.1f}x" if "sparse_vs_B" in row else f"{'-':>7}"
    return (f"{row['field']:>8} {row['density']:>5.2f} {row['batch']:>6} {row['task']:>10} {row['nfe']:>4} "
            f"{row['A_ms']:>9.1f} {row['masked_ms']:>9.1f} {b} {row['sparse_ms']:>9.1f} "
            f"{row['sparse_vs_A']:>6.1f}x {vs_b} {row['flop_ratio']:>6.1f}x")


HEADER = (f"{'field':>8} {'dens':>5} {'batch':>6} {'task':>10} {'NFE':>4} {'A ms':>9} {'masked ms':>9} "
          f"{'B ms':>9} {'sparse ms':>9} {'vs A':>7} {'vs B':>7} {'FLOPs':>7}")
