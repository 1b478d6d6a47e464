"""Two controls for the Sparse Flows study (bench/sparse_flows.py), on gaussians, seed 0:

* capacity: a DENSE narrow CNF (2 -> w x 3 tanh, the demo's recipe) trained from scratch; 2 -> 8x3
  holds 160 weights, what 98% sparsity of the demo's 2 -> 64x3 field keeps, so its NLL says whether
  98% has the capacity at all;
* retraining alone: the study's dense paper-architecture flow retrained one round WITHOUT pruning
  (a fresh AdamW, the study's steps and LR), so a gap of the pruned rounds can be told apart from
  what the retraining recipe costs by itself.

    OMP_NUM_THREADS=1 python bench/sparse_flows_controls.py      # ~5 min on one core
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import sparseode.data as D
from sparseode import demo
from sparseode.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_flows as sf  # noqa: E402
from prune_flows import test_nll  # noqa: E402


def weight_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.endswith("weight"))


def capacity(widths: list[int], epochs: int, dense: torch.nn.Module, data: dict[str, torch.Tensor]) -> None:
    dense_nll, dense_n = test_nll(dense, data["test"]), weight_count(dense)
    for w in widths:
        torch.manual_seed(0)
        model = demo.make_cnf((w, w, w), demo.TRAIN_TOL)
        n = weight_count(model)
        t0 = time.perf_counter()
        fit(model, data["train"], epochs=epochs, batch_size=demo.BATCH, lr=demo.LR, val_data=data["val"], seed=0,
            progress=False)
        nll = test_nll(model, data["test"])
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            cov = D.mode_coverage(model.sample(2000), "gaussians")
        print(f"dense 2 -> {w}x3, {n} weights ({1 - n / dense_n:.1%} fewer than 2 -> 64x3), {epochs} epochs: test NLL "
              f"{nll:.3f} ({nll - dense_nll:+.3f} against the 64-wide dense {dense_nll:.3f}), modes held "
              f"{cov['modes_held']}/{cov['n_modes']}, {time.perf_counter() - t0:.0f} s", flush=True)


def retraining(args: argparse.Namespace, data: dict[str, torch.Tensor], budgets: list[tuple[float, int]]) -> None:
    for lr, steps in budgets:
        model = sf.dense_model(args, "gaussians", "paper", 0, data)
        before = test_nll(model, data["test"])
        epochs = max(1, math.ceil(steps * args.batch / len(data["train"])))
        fit(model, data["train"], epochs=epochs, max_steps=steps, batch_size=args.batch, lr=lr, val_data=data["val"],
            seed=0, progress=False)
        print(f"paper arch, unpruned, one round of {steps} steps at lr {lr:g}: test NLL {before:.3f} -> "
              f"{test_nll(model, data['test']):.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[8, 10])
    p.add_argument("--epochs", type=int, default=90, help="training epochs of the narrow dense flows")
    p.add_argument("--cache", default="runs/sparse_flows", help="the study's dense-model cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="smoke-test budget (seconds): the study's --tiny, one epoch")
    own = p.parse_args(argv)
    torch.set_num_threads(own.threads)
    args = sf.parse(["--tiny"] if own.tiny else ["--cache", own.cache])
    if own.tiny:
        own.widths, own.epochs = [2], 1
    data = sf.make_data("gaussians", args.n_train, args.n_test, 0)
    capacity(own.widths, own.epochs, sf.dense_model(args, "gaussians", "demo", 0, data), data)
    retraining(args, data, [(args.retrain_lr, args.steps), (1e-3, args.steps), (args.retrain_lr, 5 * args.steps)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
