"""The ``sparseode`` command: ``sparseode info`` (backends), ``demo``, ``train``, ``prune``, ``bench``."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

import sparseode


def _info(args: argparse.Namespace) -> int:
    print(f"sparseode {sparseode.__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    for name, st in sparseode.backends().items():
        print(f"  {name:<7} {'yes' if st.available else 'no '}  {st.reason}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="gaussians", help="a toy mixture density (default: gaussians)")
    p.add_argument("--out", default="runs/demo", help="output folder (JSON record, checkpoints, plots)")
    p.add_argument("--epochs", type=int, default=12, help="dense training epochs")
    p.add_argument("--retrain-epochs", type=int, default=3, help="retraining epochs per pruning round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _demo(args: argparse.Namespace) -> int:
    from sparseode.demo import run_demo

    run_demo(args.dataset, args.out, epochs=args.epochs, retrain_epochs=args.retrain_epochs, seed=args.seed,
             progress=not args.no_progress)
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("print the backends usable here and why any is missing", lambda p: None, _info),
    "demo": ("train a CNF, prune it to 90% and 98%, sparsify, and compare solves", _demo_args, _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseode", description=sparseode.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
