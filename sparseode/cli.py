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
    from sparseode.ops.extension import cpu_capability

    print(f"  CPU kernel variant: {cpu_capability() or 'none (sparseode._C not loaded)'}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="gaussians", help="a toy mixture density (sparseode.data.MIXTURES)")
    p.add_argument("--out", default="runs/demo", help="output folder (JSON record, checkpoints, plots)")
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    p.add_argument("--retrain-epochs", type=int, default=12, help="retraining epochs per pruning round")
    p.add_argument("--seed", type=int, default=0, help="seed of the data draws and the initialisation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _demo(args: argparse.Namespace) -> int:
    from sparseode.demo import run_demo

    run_demo(args.dataset, args.out, epochs=args.epochs, retrain_epochs=args.retrain_epochs, seed=args.seed,
             progress=not args.no_progress)
    return 0


def _model_for(kind: str, dataset: str, hidden: list[int]):
    from sparseode import data, models

    if kind == "cnf":
        train = data.toy(dataset, n=8192, seed=0)
        val = data.toy(dataset, n=2048, seed=1)
        model = models.CNF(models.MLPVectorField(train.shape[1], tuple(hidden), activation="tanh"), rtol=1e-3, atol=1e-3)
        return model, train, val
    X, y = data.classification(dataset, n=4096, seed=0)
    Xv, yv = data.classification(dataset, n=1024, seed=1)
    model = models.ODEClassifier(X.shape[1], tuple(hidden), int(y.max()) + 1, augment=1, time="concat")
    return model, (X, y), (Xv, yv)


def _write_record(out: str, name: str, record: dict) -> None:
    import json
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / name).write_text(json.dumps(record, indent=1, default=float))


def _start_ranks() -> bool:
    """Join torchrun's process group when launched by it (gloo: these models run on the CPU);
    True on the process that writes files and prints (rank 0, or the only one)."""
    from sparseode import distributed

    distributed.init("cpu")
    return distributed.is_main()


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["cnf", "classifier"], default="cnf", help="what to train")
    p.add_argument("--dataset", default="gaussians", help="toy density (cnf) or classification set (classifier)")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64], help="hidden widths of the vector field")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=512, help="minibatch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling")
    p.add_argument("--out", default="runs/train", help="folder for model.pt (sparseode.save) and train.json")


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparseode.checkpoint import save
    from sparseode.train import fit

    main = _start_ranks()
    torch.manual_seed(args.seed)  # the same initial model on every rank (and in every run)
    model, train, val = _model_for(args.model, args.dataset, args.hidden)
    result = fit(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, val_data=val,
                 seed=args.seed)
    if not main:
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    save(model, Path(args.out) / "model.pt")
    _write_record(args.out, "train.json", {"model": args.model, "dataset": args.dataset, "hidden": args.hidden,
                                           "best_val": result.best_val, "epochs": result.epochs_run,
                                           "history": result.history})
    print(f"best validation metric {result.best_val:.4f}; wrote {args.out}/model.pt, train.json")
    return 0


SPARSE_FLAG = {"auto": "auto", "on": True, "off": False}  # --sparse -> iterative(sparse=)


def _prune_args(p: argparse.ArgumentParser) -> None:
    from sparseode.prune.presets import PRESETS

    p.add_argument("--checkpoint", required=True, help="model.pt written by `sparseode train` (or sparseode.save)")
    p.add_argument("--dataset", default=None, help="retraining data (default: the one in train.json beside it)")
    p.add_argument("--target", type=float, default=0.9, help="final sparsity in [0, 1)")
    p.add_argument("--rounds", type=int, default=5, help="pruning rounds")
    p.add_argument("--method", default="magnitude", help="importance measure (sparseode.prune.MEASURES)")
    p.add_argument("--granularity", default="weight", choices=["weight", "neuron", "block"], help="what a pruned unit is")
    p.add_argument("--stop", choices=["none", "icp"], default="none", help="ICP early stopping of intermediate rounds")
    p.add_argument("--retrain-epochs", type=int, default=3, help="retraining epochs per round")
    p.add_argument("--out", default="runs/prune", help="folder for pruned.pt, sparse.pt (sparseode.save), prune.json")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run from its last round saved in OUT/rounds")
    p.add_argument("--sparse", choices=["auto", "on", "off"], default="auto",
                   help="retrain each round on the sparsified model: auto = where the fused field op makes it "
                        "faster (fields on the CPU with the C++ extension, layers at density <= 0.9); on = always; "
                        "off = masked dense retraining")
    p.add_argument("--schedule", default=None, choices=sorted(PRESETS),
                   help="a preset cascade of the Sparse Flows paper instead of --rounds (its rounds; --target "
                        "truncates it)")
    p.add_argument("--min-density", type=float, default=None,
                   help="the least share of its weights every layer keeps (sparseode.prune.apply)")


def _prune(args: argparse.Namespace) -> int:
    import functools
    import json
    from pathlib import Path

    from sparseode import prune
    from sparseode.checkpoint import load, save
    from sparseode.nn.convert import sparsify
    from sparseode.train import fit

    main = _start_ranks()
    model = load(args.checkpoint)
    meta_path = Path(args.checkpoint).with_name("train.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise SystemExit("--dataset is needed: no train.json next to the checkpoint")
    _, train, val = _model_for(meta.get("model", "cnf"), dataset, meta.get("hidden", [64, 64, 64]))
    retrain = functools.partial(fit, data=train, val_data=val, epochs=args.retrain_epochs, lr=3e-3, batch_size=512)
    stop = None
    if args.stop == "icp":
        probe = [(val[:512],)] if isinstance(val, torch.Tensor) else [(val[0][:512], val[1][:512])]
        stop = prune.ICP(probe=probe)
    tensors = (train,) if isinstance(train, torch.Tensor) else tuple(train)
    scoring = [tuple(t[i:i + 512] for t in tensors) for i in range(0, 4 * 512, 512)]  # data-driven measures
    history = prune.iterative(model, fit=retrain, target=args.target, schedule=args.schedule,
                              rounds=None if args.schedule else args.rounds, method=args.method,
                              granularity=args.granularity, stop=stop, data=scoring, n_batches=len(scoring),
                              checkpoint_dir=Path(args.out) / "rounds", resume=args.resume,
                              sparse=SPARSE_FLAG[args.sparse], min_density=args.min_density)
    if not main:
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    save(model, Path(args.out) / "pruned.pt")
    save(sparsify(model), Path(args.out) / "sparse.pt")
    _write_record(args.out, "prune.json", {"checkpoint": args.checkpoint, "target": args.target,
                                           "method": args.method, "stop": args.stop, "sparse": args.sparse,
                                           "schedule": args.schedule, "rounds": history.to_dicts(),
                                           "total_epochs": history.total_epochs})
    print(prune.sparsity(model))
    print(f"retraining epochs {history.total_epochs:.1f}; wrote {args.out}/pruned.pt, sparse.pt, prune.json")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    from sparseode import benchmark

    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--fields", nargs="+", choices=sorted(benchmark.FIELDS), default=["toy64", "wide256"],
                   help="benchmark fields (sparseode.benchmark.FIELDS)")
    p.add_argument("--density", type=float, nargs="+", default=[0.1, 0.02], help="kept shares of the weights")
    p.add_argument("--batch", type=int, nargs="+", default=[1000], help="batch sizes")
    p.add_argument("--tasks", nargs="+", choices=benchmark.TASKS, default=["log_prob"], help="what to time")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json")
    suites = p.add_subparsers(dest="suite", metavar="SUITE", help="field: issue 16's field benchmark instead")
    field = suites.add_parser("field", help="the fused field against dense torch/A and B (sparseode.fieldbench)",
                              description="the fused field against dense torch/A and B (sparseode.fieldbench)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from sparseode import fieldbench

    fieldbench.add_arguments(field)


def _bench(args: argparse.Namespace) -> int:
    from sparseode import benchmark

    if args.suite == "field":
        from sparseode import fieldbench

        return fieldbench.run_from_args(args)
    print(benchmark.HEADER)
    rows = benchmark.run(args.fields, args.density, args.batch, args.tasks, device=args.device,
                         report=lambda r: print(benchmark.format_row(r), flush=True))
    _write_record(args.out, "bench.json", {"device": args.device, "rows": rows})
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("print the backends usable here and why any is missing", lambda p: None, _info),
    "demo": ("train a CNF, prune it to 90% and 98%, sparsify, and compare solves", _demo_args, _demo),
    "train": ("train a CNF or an ODE classifier on a toy dataset", _train_args, _train),
    "prune": ("prune a trained checkpoint iteratively (optionally with ICP) and sparsify it", _prune_args, _prune),
    "bench": ("time CNF solves: dense vs masked vs sparsified (sparseode.benchmark); `bench field`: the fused "
              "field grid of issue 16 (sparseode.fieldbench)", _bench_args, _bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseode", description=sparseode.__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        # help strings are %-formatted by argparse (the description is not)
        add_args(sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sparseode import distributed

    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command][2](args)
    except BaseException:
        distributed.shutdown(wait=False)  # the process group train/prune joined under torchrun
        raise
    distributed.shutdown()
    return result


if __name__ == "__main__":
    sys.exit(main())
