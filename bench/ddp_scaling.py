"""One training epoch's wall time on 1 and N processes (``torchrun`` + DDP, gloo on CPU).

``python bench/ddp_scaling.py`` launches ``torchrun --nproc_per_node P`` of this same file for
every ``P, threads`` in ``--configs``, ``--repeats`` times, and prints one table row each: the
wall time of the second of two epochs (the first pays for start-up), best of the repeats, the
speed-up over the first configuration, and the final training loss (the same global batch, so
the same run up to float reduction order).
The worker (``--worker``) trains ``sparseode train``'s CNF: ``MLPVectorField(2, (64, 64, 64))``,
tanh, dopri5 at rtol=atol=1e-3, 8192 gaussians points, global batch 512.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def worker(args: argparse.Namespace) -> None:
    import torch

    from sparseode import data, distributed, models
    from sparseode.train import fit

    torch.set_num_threads(args.threads)
    distributed.init("cpu")
    torch.manual_seed(0)
    x = data.toy("gaussians", n=args.n, seed=0)
    model = models.CNF(models.MLPVectorField(2, tuple(args.hidden), activation="tanh"), rtol=1e-3, atol=1e-3)
    res = fit(model, x, epochs=2, lr=3e-3, batch_size=args.batch_size, progress=False)
    if distributed.is_main():
        print(json.dumps({"epoch_s": res.history[1]["time"], "loss": res.history[1]["loss"],
                          "steps": res.steps}), flush=True)
    distributed.shutdown()


def launch(procs: int, threads: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", __file__,
           "--worker", "--threads", str(threads), "--points", str(args.n), "--batch-size", str(args.batch_size),
           "--hidden", *map(str, args.hidden)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"],
                   help="PROCESSESxTHREADS_PER_PROCESS to time (default: 1x1 1x2 2x1)")
    p.add_argument("--repeats", type=int, default=2, help="launches per configuration (the best is shown)")
    p.add_argument("--points", dest="n", type=int, default=8192, help="training points")
    p.add_argument("--batch-size", type=int, default=512, help="global batch size")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64], help="hidden widths")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    print(f"{'processes':>9} {'threads':>7} {'epoch s':>8} {'speed-up':>8} {'loss':>8}")
    base = None
    for cfg in args.configs:
        procs, threads = (int(v) for v in cfg.split("x"))
        r = min((launch(procs, threads, args) for _ in range(args.repeats)), key=lambda x: x["epoch_s"])
        base = base or r["epoch_s"]
        print(f"{procs:>9} {threads:>7} {r['epoch_s']:8.2f} {base / r['epoch_s']:8.2f} {r['loss']:8.4f}", flush=True)


if __name__ == "__main__":
    main()
