"""The `sparseode` command end to end on tiny budgets: train -> prune -> reload, demo, bench."""
import argparse
import contextlib
import io
import json
import shutil
import subprocess

import pytest
import torch

import sparseode as so
from sparseode import cli
from sparseode.nn.field import SparseMLPField


def test_train_then_prune_then_reload(tmp_path):
    train_dir, prune_dir = tmp_path / "train", tmp_path / "prune"
    assert cli.main(["train", "--hidden", "8", "8", "--epochs", "1", "--out", str(train_dir)]) == 0
    record = json.loads((train_dir / "train.json").read_text())
    assert record["dataset"] == "gaussians" and record["history"]
    assert cli.main(["prune", "--checkpoint", str(train_dir / "model.pt"), "--target", "0.8", "--rounds", "2",
                     "--retrain-epochs", "1", "--out", str(prune_dir)]) == 0
    # every checkpoint is a sparseode.save file: tensors and plain containers, no pickled code
    for path in (train_dir / "model.pt", prune_dir / "pruned.pt", prune_dir / "sparse.pt"):
        assert torch.load(path, weights_only=True)["sparseode_checkpoint"] == 1, path
    trained, pruned, sparse = (so.load(p) for p in (train_dir / "model.pt", prune_dir / "pruned.pt",
                                                    prune_dir / "sparse.pt"))
    # format="auto" may keep these 8-wide layers dense where dense measures faster: the file says which
    sparse_layers = torch.load(prune_dir / "sparse.pt", weights_only=True)["sparse"]
    assert bool(sparse_layers) == any(isinstance(m, SparseMLPField) for m in sparse.modules())
    assert float(so.prune.sparsity(pruned)) == pytest.approx(0.8, abs=0.01)
    assert not any(hasattr(m, "weight_mask") for m in trained.modules())
    x = torch.randn(64, 2)
    with torch.no_grad():
        torch.testing.assert_close(sparse.log_prob(x), pruned.log_prob(x), atol=1e-4, rtol=1e-4)
    rounds = json.loads((prune_dir / "prune.json").read_text())["rounds"]
    assert len(rounds) == 2 and abs(rounds[-1]["sparsity"] - 0.8) < 0.01


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    from sparseode import demo
    from sparseode.demo import run_demo

    record = run_demo("gaussians", tmp_path, hidden=(16, 16), epochs=1, retrain_epochs=1, n_train=512,
                      batch_size=256, progress=False)
    assert [r["sparsity"] for r in record["rows"]] == [0.0, 0.9, 0.98]
    table = capsys.readouterr().out
    assert "vs dense" in table and "strict" in table
    for r in record["rows"]:  # the strict mode metric of each row is printed with its verdict
        assert r["mode_line"] in table and ("pass" in r["mode_line"]) == r["strict_ok"]
        assert f"{r['test_nll'] - record['rows'][0]['test_nll']:+.3f}" in table
    assert record["rows"][1]["params"] < record["rows"][0]["params"]
    assert record["rule"] == demo.RULE and record["schedule"] == list(demo.SCHEDULE)  # the study's choice
    # 2 -> u -> u -> 2 keeps 4u + u^2 of 320 weights: the unit counts nearest each weight keep ratio
    assert [round(q * 16) for q in record["unit_schedule"]] == [11, 7, 4, 2, 1]
    assert [r["sparsity"] for r in record["rounds"]] == pytest.approx([1 - (4 * u + u * u) / 320
                                                                       for u in (11, 7, 4, 2, 1)])
    assert f"({demo.RULE['method']}, {demo.RULE['granularity']};" in table
    for name in ("demo.json", "dense.pt", "pruned_90.pt", "pruned_98.pt", "sparse_98.pt", "flow_dense.png",
                 "flow_98.png", "nll_vs_sparsity.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    sparse = so.load(tmp_path / "sparse_98.pt")  # sparseode.save files, no pickled model
    pruned = so.load(tmp_path / "pruned_98.pt")
    assert sparse.field.time is None  # the demo's field is autonomous
    sparse_layers = torch.load(tmp_path / "sparse_98.pt", weights_only=True)["sparse"]  # format="auto" chose
    assert bool(sparse_layers) == isinstance(sparse.field, SparseMLPField)
    assert float(so.prune.sparsity(pruned)) == pytest.approx(0.98, abs=0.01)
    x = torch.randn(32, 2)
    with torch.no_grad():
        torch.testing.assert_close(sparse.log_prob(x), pruned.log_prob(x), atol=1e-4, rtol=1e-4)
    assert not any(hasattr(m, "weight_mask") for m in so.load(tmp_path / "dense.pt").modules())


def test_bench_command_writes_rows(tmp_path):
    assert cli.main(["bench", "--fields", "toy64", "--density", "0.1", "--batch", "50", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows[0]["equal_nfe"] and rows[0]["max_rel_diff"] < 1e-4


@pytest.mark.parametrize("argv", [["--help"], ["-h"]] + [[name, "--help"] for name in cli.COMMANDS])
def test_help_of_the_command_and_every_subcommand(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    text = out.getvalue()
    assert text.startswith("usage: sparseode")
    if len(argv) == 1:
        assert all(name in text for name in cli.COMMANDS)
    else:
        parser = cli.build_parser()._subparsers._group_actions[0].choices[argv[0]]
        flat = " ".join(text.split())  # undo argparse's line wrapping
        for action in parser._actions:  # every option shows its help and its default
            if action.option_strings and action.default is not argparse.SUPPRESS:
                assert f"{action.help} (default: {action.default})" in flat, action.dest
        assert "%%" not in text


def test_help_of_the_installed_script():
    exe = shutil.which("sparseode")
    assert exe is not None, "the sparseode console script is not installed"
    for argv in (["--help"], ["demo", "--help"]):
        done = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage: sparseode" in done.stdout and "90% and 98%" in done.stdout
