"""Issue 16's field benchmark (bench/field.py = sparseode.fieldbench, `sparseode bench field`) on
tiny grids: rows carry real, consistent values; a wrong weight or gradient fails the check before
anything is timed; the grids, the time estimate and the README table are what they say."""
from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch

from sparseode import cli, fieldbench
from sparseode.fieldbench import grid as grid_mod
from sparseode.fieldbench import report, sweep
from sparseode.fieldbench.cases import build_case
from sparseode.fieldbench.tasks import TASKS, CheckFailed, Inputs, Runner, check, reference_result

TINY = ["--min-run-time", "0", "--max-repeats", "2", "--name", "tiny"]


def _rows(path):
    return json.loads(path.read_text())["rows"]


def test_tiny_grid_rows_are_checked_timed_and_written(tmp_path, capsys, load_bench):
    field = load_bench("field")
    argv = ["--archs", "toy64", "--densities", "0.1", "--batches", "32", "--out-dir", str(tmp_path), *TINY]
    assert field.main(argv) == 0
    rows = _rows(tmp_path / "tiny.json")
    assert [r["task"] for r in rows] == list(TASKS)
    # toy 2 -> 64x3: dense MACs 2*64 + 2*64*64 + 64*2; l1_unstructured keeps 4096 - round(0.9 * 4096) = 410
    assert rows[0]["flop_ratio"] == pytest.approx((128 + 8192 + 128) / (128 + 2 * 410 + 128))
    for r in rows:
        for key in ("A_ms", "B_ms", "sparse_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["task"], key)
        assert r["sparse_vs_A"] == pytest.approx(r["A_ms"] / r["sparse_ms"])
        assert r["sparse_vs_B"] == pytest.approx(r["B_ms"] / r["sparse_ms"])
        assert r["nfe"] == (1 if r["task"] == "forward" else 16)  # rk4, 4 steps, one flow
        assert r["max_rel_error"] < 1e-3 and r["B_max_rel_error"] < 1e-3
        assert 1 <= r["repeats"]["sparse"] <= 2
    with (tmp_path / "tiny.csv").open() as fh:
        lines = list(csv.DictReader(fh))
    assert [line["task"] for line in lines] == list(TASKS)
    assert float(lines[3]["sparse_ms"]) == pytest.approx(rows[3]["sparse_ms"])
    out = capsys.readouterr().out
    table = (tmp_path / "tiny.md").read_text().strip()
    assert table in out
    want = (f"| 2 -> 64x3 | 0.1 | 32 | {rows[0]['flop_ratio']:.1f}x | "
            + " | ".join(f"{r['sparse_vs_A']:.2f}x / {r['sparse_vs_B']:.2f}x" for r in rows) + " |")
    assert want in table.splitlines()
    assert "estimated" in out.splitlines()[0]


def test_power_field_training_gradients_match_per_parameter(tmp_path, load_bench):
    field = load_bench("field")
    argv = ["--archs", "power", "--densities", "0.5", "--batches", "8", "--tasks", "train", "--steps", "1",
            "--out-dir", str(tmp_path), *TINY]
    assert field.main(argv) == 0
    (row,) = _rows(tmp_path / "tiny.json")
    assert row["nfe"] == 5 * 4 and row["flows"] == 5 and row["time"] == "concatsquash"
    assert 0 < row["max_rel_error"] < 1e-3


def _wrong_weight(case):
    with torch.no_grad():
        values = case.sparse[0].layers[1].sparse.values
        values[values.abs().argmax()] *= -1.0
    return case


@pytest.mark.parametrize("task", TASKS)
def test_a_wrong_sparse_weight_fails_every_task(task):
    case = _wrong_weight(build_case("toy64", 0.1))
    inputs = Inputs.draw(16, 2)
    want = reference_result(task, Runner(case, "dense", inputs, steps=1))
    with pytest.raises(CheckFailed, match=f"{task} of the sparse form"):
        check(task, Runner(case, "sparse", inputs, steps=1), want)


def test_a_wrong_dense_path_weight_fails_the_B_check():
    case = build_case("toy64", 0.5)
    with torch.no_grad():
        case.ours_dense[0].layers[2].weight[0, 0] += 1.0
    inputs = Inputs.draw(16, 2)
    want = reference_result("log_prob", Runner(case, "dense", inputs, steps=1))
    with pytest.raises(CheckFailed, match="log_prob of the ours_dense form"):
        check("log_prob", Runner(case, "ours_dense", inputs, steps=1), want)


def test_a_wrong_gradient_fails_the_training_check_only():
    case = build_case("toy64", 0.1)
    case.sparse[0].layers[1].sparse.values.register_hook(lambda g: 2.0 * g)  # values right, gradient wrong
    inputs = Inputs.draw(16, 2)
    dense, sparse = Runner(case, "dense", inputs, steps=1), Runner(case, "sparse", inputs, steps=1)
    assert check("log_prob", sparse, reference_result("log_prob", dense)) < 1e-4
    with pytest.raises(CheckFailed, match=r"gradient of fields\.0\.layers\.1\.weight"):
        check("train", sparse, reference_result("train", dense))


def test_the_run_stops_at_a_failed_check(tmp_path, capsys, monkeypatch, load_bench):
    field = load_bench("field")
    monkeypatch.setattr(sweep, "build_case", lambda *a: _wrong_weight(build_case(*a)))
    argv = ["--archs", "toy64", "--densities", "0.1", "--batches", "8", "--tasks", "forward", "--out-dir",
            str(tmp_path), *TINY]
    assert field.main(argv) == 1
    assert "forward of the sparse form" in capsys.readouterr().err
    assert not (tmp_path / "tiny.json").exists()


def test_measure_repeats_within_its_limits():
    calls = []
    assert sweep.measure(lambda: calls.append(1), min_run_time=0.0, min_repeats=3).repeats == 3 == len(calls)
    assert sweep.measure(lambda: None, min_run_time=60.0, max_repeats=5).repeats == 5


def test_named_grids_and_what_issue_leaves_out():
    full, issue = grid_mod.GRIDS["full"], grid_mod.GRIDS["issue"]
    assert len(full.cells()) * len(full.densities) == 4 * 4 * 2 * 4
    assert sorted(issue.left_out()) == [("wide1024", 10000, t) for t in ("log_prob", "sample", "train")]
    assert len(issue.cells()) == len(full.cells()) - 3
    narrowed = issue.narrowed(archs=["wide1024"], batches=[10000])
    assert narrowed.cells() == [("wide1024", 10000, "forward")]


def test_estimate_adds_references_checks_and_timings():
    g = grid_mod.Grid(("toy64",), (0.5, 0.1), (100,), ("log_prob",))
    got = grid_mod.estimate_seconds(g, steps=4, min_run_time=1.0, min_repeats=1, forward_seconds={("toy64", 100): 0.01})
    a = 0.01 * 16 * (1 + 0.9 * 2)  # 16 evaluations, each a forward and 2 vector-Jacobian products
    # A runs once per density (the references) and is timed (>= 1 s); B is checked and timed
    sparse = [a * (0.25 + 0.75 * d) for d in (0.5, 0.1)]
    assert got == pytest.approx(2 * a + 1.0 + a + 1.0 + sum(s + 1.0 for s in sparse))


def test_markdown_table_of_rows():
    rows = [dict(field="wide256", density=0.1, batch=1000, task="forward", flop_ratio=9.6, sparse_vs_A=8.0,
                 sparse_vs_B=7.5),
            dict(field="power", density=0.02, batch=10000, task="train", flop_ratio=3.0, sparse_vs_A=1.25,
                 sparse_vs_B=0.5)]
    lines = report.markdown_table(rows).splitlines()
    assert lines[0] == "| field | density | batch | FLOP ratio | forward vs dense / B | train step vs A / B |"
    assert lines[2] == "| 2 -> 256x3 | 0.1 | 1000 | 9.6x | 8.00x / 7.50x | - |"
    assert lines[3] == "| 6 -> 60x3 concatsquash, 5 flows | 0.02 | 10000 | 3.0x | - | 1.25x / 0.50x |"


def test_sparseode_bench_field_command_and_table_regeneration(tmp_path, capsys):
    tables = []
    for density in ("0.5", "0.1"):
        argv = ["bench", "field", "--archs", "toy64", "--densities", density, "--batches", "8", "--tasks", "forward",
                "--json", str(tmp_path / f"d{density}.json"), *TINY]
        assert cli.main(argv) == 0
        tables.append((tmp_path / f"d{density}.md").read_text().strip().splitlines())
    capsys.readouterr()
    assert cli.main(["bench", "field", "--table", str(tmp_path / "d0.5.json"), str(tmp_path / "d0.1.json")]) == 0
    # one table: the header once, then both runs' rows in order
    assert capsys.readouterr().out.strip().splitlines() == tables[0] + tables[1][2:]


def test_bench_field_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["bench", "field", "--help"])
    assert exit_info.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert flat.startswith("usage: sparseode bench field")
    probe = argparse.ArgumentParser()
    fieldbench.add_arguments(probe)
    for action in probe._actions:
        if action.dest != "help":
            assert f"{' '.join(action.help.split())} (default: {action.default})" in flat, action.dest


@pytest.mark.parametrize("bad", [["--densities", "0"], ["--densities", "1.5"], ["--batches", "0"],
                                 ["--min-run-time", "-1"], ["--archs", "nope"]])
def test_bad_arguments_are_refused_by_name(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["bench", "field", *bad])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_a_training_cell_leaves_the_weights_as_built_for_the_next_task(tmp_path, load_bench):
    # Adam moves the dense reference's pruned weights off zero; later tasks must not see that
    field = load_bench("field")
    argv = ["--archs", "toy64", "--densities", "0.5", "--batches", "8", "--tasks", "train", "forward",
            "--out-dir", str(tmp_path), *TINY]
    assert field.main(argv) == 0
    assert [r["task"] for r in _rows(tmp_path / "tiny.json")] == ["train", "forward"]
