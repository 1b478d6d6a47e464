"""Quality bar of the toy models (issue 4): a CNF on `gaussians` and an ODE classifier on `concentric`.

    python bench/toy_quality.py                # full run (prints a table; see README)
    python bench/toy_quality.py --quick        # a smaller budget, for a smoke test

Checks:
  * CNF(MLPVectorField(2, (64, 64, 64), activation="tanh")) on `gaussians`: test NLL (dopri5,
    rtol = atol = 1e-5) within 0.15 nats of the true differential entropy of the normalised
    mixture (the floor no model can beat), and samples that capture all 6 modes.
  * ODEClassifier on `concentric`: test accuracy >= 99%.
Exit status 1 if a check fails. Optional --plots DIR writes the density/sample figure and curves.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import sparseode.data as D
from sparseode.models import CNF, MLPVectorField, ODEClassifier
from sparseode.train import evaluate, fit


def run_flow(args: argparse.Namespace) -> dict:
    train = D.toy("gaussians", args.n_train, seed=1)
    val = D.toy("gaussians", 2000, seed=2)
    test = D.toy("gaussians", args.n_test, seed=3)
    torch.manual_seed(args.seed)
    field = MLPVectorField(2, (64, 64, 64), activation="tanh")
    cnf = CNF(field, trace="exact", method="dopri5", rtol=args.train_tol, atol=args.train_tol)
    t0 = time.perf_counter()
    result = fit(cnf, train, epochs=args.flow_epochs, lr=args.lr, batch_size=args.batch_size,
                 milestones=args.milestones, gamma=0.3, val_data=val, seed=args.seed,
                 progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    cnf.rtol = cnf.atol = 1e-5  # evaluate at the library's default tolerance
    t0 = time.perf_counter()
    ev = evaluate(cnf, test, batch_size=5000)
    with torch.no_grad():
        samples = cnf.sample(args.n_samples, generator=torch.Generator().manual_seed(0))
    cov = D.mode_coverage(samples, "gaussians")
    floor = D.true_entropy("gaussians")
    true_nll = float(-D.mixture("gaussians").log_prob(test.double()).mean())
    out = {
        "test_nll": ev["nll"], "entropy_floor": floor, "gap": ev["nll"] - floor,
        "true_density_nll_on_test": true_nll, "modes_captured": cov["modes_captured"],
        "n_modes": cov["n_modes"], "high_quality": dict(zip(cov["ks"], cov["high_quality"])),
        "best_epoch": result.best_epoch, "steps": result.steps, "train_s": train_s,
        "eval_s": time.perf_counter() - t0, "eval_nfe": ev.get("nfe"),
        "train_nfe_last_epoch": result.history[-1]["nfe"],
    }
    if args.plots:
        from sparseode.plots import plot_flow, plot_training
        plot_flow(cnf, test[:5000], f"{args.plots}/gaussians_flow.png", samples=samples,
                  true_density=D.mixture("gaussians"))
        plot_training(result, f"{args.plots}/gaussians_training.png")
    return out


def run_classifier(args: argparse.Namespace) -> dict:
    x_train, y_train = D.classification("concentric", args.n_clf, seed=1)
    x_val, y_val = D.classification("concentric", 1000, seed=2)
    x_test, y_test = D.classification("concentric", 5000, seed=3)
    torch.manual_seed(args.seed)
    clf = ODEClassifier(2, (32, 32), 2, augment=1, time="concat")
    t0 = time.perf_counter()
    result = fit(clf, (x_train, y_train), epochs=args.clf_epochs, lr=1e-2, batch_size=128,
                 val_data=(x_val, y_val), seed=args.seed, progress=not args.no_progress)
    ev = evaluate(clf, (x_test, y_test))
    return {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "steps": result.steps,
            "train_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budget (smoke test, bar not expected)")
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--n-test", type=int, default=20_000)
    p.add_argument("--n-samples", type=int, default=5_000)
    p.add_argument("--flow-epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--milestones", type=int, nargs="*", default=[25, 35])
    p.add_argument("--train-tol", type=float, default=1e-4, help="solver rtol = atol while training")
    p.add_argument("--n-clf", type=int, default=2000)
    p.add_argument("--clf-epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy box)")
    p.add_argument("--plots", default=None, help="folder for figures")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.flow_epochs, args.milestones = 4000, 4000, 4, [3]
        args.n_clf, args.clf_epochs = 1000, 4
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    flow = run_flow(args)
    clf = run_classifier(args)
    wall = time.perf_counter() - t0

    ok_nll = flow["gap"] <= 0.15
    ok_modes = flow["modes_captured"] == flow["n_modes"]
    ok_acc = clf["test_accuracy"] >= 0.99
    print("\nsparseode toy quality bar")
    print(f"  CNF gaussians   test NLL        {flow['test_nll']:.4f} nats  (test set of {args.n_test})")
    print(f"                  entropy floor   {flow['entropy_floor']:.4f} nats  (true density on the test set: "
          f"{flow['true_density_nll_on_test']:.4f})")
    print(f"                  gap             {flow['gap']:.4f} nats  (bar <= 0.15)  {'PASS' if ok_nll else 'FAIL'}")
    print(f"                  modes captured  {flow['modes_captured']}/{flow['n_modes']}  "
          f"{'PASS' if ok_modes else 'FAIL'}")
    hq = "  ".join(f"k={k:g}: {v:.3f}" for k, v in flow["high_quality"].items())
    print(f"                  high-quality    {hq}")
    print(f"                  train {flow['steps']} steps in {flow['train_s']:.0f} s (best epoch "
          f"{flow['best_epoch']}, train NFE {flow['train_nfe_last_epoch']:.0f}), eval NFE {flow['eval_nfe']:.0f}")
    print(f"  ODE classifier  concentric test accuracy {clf['test_accuracy']:.4f}  (bar >= 0.99)  "
          f"{'PASS' if ok_acc else 'FAIL'}  ({clf['steps']} steps, {clf['train_s']:.0f} s)")
    print(f"  wall time {wall:.0f} s, torch threads {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flow": flow, "classifier": clf, "wall_s": wall}, f, indent=2)
    return 0 if (ok_nll and ok_modes and ok_acc) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
