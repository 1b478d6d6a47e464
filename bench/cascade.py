"""Wall clock of a whole prune-retrain cascade on the demo's flow: masked dense retraining against
retraining on the sparsified model (``iterative(sparse=...)``), same final NLL.

The demo's flow: ``CNF(MLPVectorField(2, (64, 64, 64), activation="tanh"))``, exact trace, dopri5
at rtol=atol=1e-3 for training, gaussians mixture (8192 training, 2048 validation, 2048 test
points), AdamW lr 3e-3, batch 512. The dense model is trained once (not timed); each cascade starts
from a copy of it with the same seeds, so both make the same pruning decisions on (to float
rounding) the same weights. Each cascade's wall clock covers everything ``iterative`` does
(scoring, pruning, retraining with per-epoch validation, checkpoints in memory). The final models'
test NLL is computed the same way for both (rtol=atol=1e-5).

    python bench/cascade.py                          # sparse_flows_12 preset (12 rounds to 95%), 1 epoch each
    python bench/cascade.py --schedule sparse_flows --retrain-epochs 2   # the paper's 29 toy rounds
    python bench/cascade.py --sparse on              # every round sparse, also the dense-ish ones
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch

import sparseode as so
from sparseode import data as so_data
from sparseode.models import CNF, MLPVectorField
from sparseode.nn.convert import sparsify
from sparseode.prune.presets import PRESETS
from sparseode.train import evaluate, fit

MODES = {"auto": "auto", "on": True}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--schedule", default="sparse_flows_12", choices=sorted(PRESETS), help="the cascade's preset")
    p.add_argument("--target", type=float, default=None, help="final sparsity (default: the preset's end)")
    p.add_argument("--dense-epochs", type=int, default=10, help="training of the dense model (not timed)")
    p.add_argument("--retrain-epochs", type=int, default=1, help="retraining epochs per round")
    p.add_argument("--sparse", choices=sorted(MODES), default="auto", help="iterative(sparse=) of the sparse run")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64], help="hidden widths of the field")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the pair this many times, alternating, and keep each mode's fastest (noisy machines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def cnf(hidden: tuple[int, ...], tol: float) -> CNF:
    return CNF(MLPVectorField(2, hidden, activation="tanh"), trace="exact", rtol=tol, atol=tol)


def final_nll(model: CNF, hidden: tuple[int, ...], test: torch.Tensor) -> float:
    """Test NLL at rtol=atol=1e-5 of the masked ``model``'s field (run sparsified: same values)."""
    fresh = cnf(hidden, 1e-5)
    so.prune.load_pruned(fresh, model.state_dict())
    with torch.no_grad():
        return float(evaluate(sparsify(fresh), test)["nll"])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    hidden = tuple(args.hidden)
    train = so_data.toy("gaussians", n=8192, seed=args.seed)
    val = so_data.toy("gaussians", n=2048, seed=args.seed + 1)
    test = so_data.toy("gaussians", n=2048, seed=args.seed + 2)
    torch.manual_seed(args.seed)
    dense = cnf(hidden, 1e-3)
    train_fit = functools.partial(fit, data=train, batch_size=512, lr=3e-3, val_data=val, seed=args.seed,
                                  progress=False)
    t0 = time.perf_counter()
    train_fit(dense, epochs=args.dense_epochs)
    print(f"dense model: {args.dense_epochs} epochs in {time.perf_counter() - t0:.1f} s, "
          f"test NLL {final_nll(dense, hidden, test):.4f}", flush=True)
    out = {"schedule": args.schedule, "retrain_epochs": args.retrain_epochs, "threads": args.threads,
           "hidden": list(hidden), "sparse_mode": args.sparse, "repeat": args.repeat, "runs": {}}
    for _ in range(args.repeat):
        for name, mode in (("masked", False), ("sparse", MODES[args.sparse])):
            model = so.prune.clone(dense)
            t0 = time.perf_counter()
            hist = so.prune.iterative(model, functools.partial(train_fit, epochs=args.retrain_epochs),
                                      target=args.target, schedule=args.schedule, sparse=mode, seed=args.seed,
                                      progress=False)
            wall = time.perf_counter() - t0
            nll = final_nll(model, hidden, test)
            print(f"{name:>6}: {len(hist)} rounds in {wall:.1f} s, final sparsity {hist.rounds[-1].sparsity:.4f}, "
                  f"test NLL {nll:.4f} ({sum(r.sparse for r in hist.rounds)} rounds retrained sparse)", flush=True)
            if name not in out["runs"] or wall < out["runs"][name]["wall_s"]:
                out["runs"][name] = {"wall_s": wall, "test_nll": nll, "rounds": hist.to_dicts()}
    return out


def report(out: dict) -> str:
    m, s = out["runs"]["masked"], out["runs"]["sparse"]
    per_round = [(a["time_s"], b["time_s"], b["sparse"]) for a, b in zip(m["rounds"], s["rounds"])]
    sparse_rounds = [(a, b) for a, b, sp in per_round if sp]
    lines = [f"cascade {out['schedule']} ({len(per_round)} rounds, {out['retrain_epochs']} retraining epoch(s) "
             f"each, {out['threads']} threads, fastest of {out['repeat']}): masked {m['wall_s']:.1f} s, sparse {s['wall_s']:.1f} s, "
             f"ratio {m['wall_s'] / s['wall_s']:.2f}x",
             f"final test NLL: masked {m['test_nll']:.4f}, sparse {s['test_nll']:.4f} "
             f"(difference {s['test_nll'] - m['test_nll']:+.4f})"]
    if sparse_rounds:
        a, b = sum(x for x, _ in sparse_rounds), sum(y for _, y in sparse_rounds)
        lines.append(f"the {len(sparse_rounds)} rounds retrained sparse: masked {a:.1f} s, sparse {b:.1f} s, "
                     f"ratio {a / b:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = run(args)
    print(report(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
