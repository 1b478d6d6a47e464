"""bench/sparse_flows.py end to end on a tiny budget: its CSV rows, tables and Hessian rows hold real
values, and a restarted run skips the cells already written."""
from __future__ import annotations

import csv
import math

import pytest


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sparse_flows_tiny_run_writes_real_rows(tmp_path, capsys, load_bench):
    sf = load_bench("sparse_flows")
    argv = ["--tiny", "--no-progress", "--rules", "lamp,global", "--hessian", "--out", str(tmp_path)]
    assert sf.main(argv) == 0
    rows = _rows(tmp_path / "sparse_flows.csv")
    assert {(r["rule"], r["keep"]) for r in rows} == {(rule, k) for rule in ("lamp", "global")
                                                     for k in ("1.0", "0.5", "0.1")}
    for r in rows:
        nll, dense = float(r["test_nll"]), float(r["dense_nll"])
        assert math.isfinite(nll) and float(r["gap"]) == pytest.approx(nll - dense, abs=1e-9)
        assert float(r["sparsity"]) == pytest.approx(1 - float(r["keep"]), abs=2e-3)
        assert 0 <= int(r["strict_held"]) <= int(r["n_modes"]) == 6
        assert 0.0 <= float(r["off_mode"]) <= 1.0 and r["strict_ok"] in ("True", "False")
    dense_rows = [r for r in rows if r["keep"] == "1.0"]
    assert all(float(r["gap"]) == 0.0 for r in dense_rows)

    hess = _rows(tmp_path / "sparse_flows_hessian.csv")
    kept = {(h["rule"], h["keep"]): int(h["dim"]) for h in hess}
    n_weights = 2 * 64 + 64 * 64 * 2 + 64 * 2  # the demo field's weights (biases not pruned)
    assert kept[("lamp", "1.0")] == n_weights and kept[("lamp", "0.1")] == round(0.1 * n_weights)
    assert all(math.isfinite(float(h["hess_top"])) and float(h["hess_top"]) != 0.0 for h in hess)

    md = (tmp_path / "sparse_flows.md").read_text()
    lamp_90 = next(r for r in rows if r["rule"] == "lamp" and r["keep"] == "0.1")
    assert f"| 90.0% | {float(lamp_90['gap']):+.3f} |" in md  # one seed: the value itself
    assert "100 epochs per round" in md and (tmp_path / "sparse_flows.png").stat().st_size > 0
    assert "| 90.0% |" in capsys.readouterr().out

    assert sf.main(argv) == 0  # finished cells are not run again
    assert len(_rows(tmp_path / "sparse_flows.csv")) == len(rows)


def test_sparse_flows_rejects_unknown_choices(load_bench):
    sf = load_bench("sparse_flows")
    for argv in (["--rules", "lamp,magic"], ["--archs", "huge"], ["--datasets", "nope"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            sf.parse(argv)


def test_sparse_flows_neuron_rule_prunes_units_to_the_schedules_weight_density(tmp_path, load_bench):
    sf = load_bench("sparse_flows")
    assert sf.main(["--tiny", "--no-progress", "--rules", "neuron", "--out", str(tmp_path)]) == 0
    rows = [r for r in _rows(tmp_path / "sparse_flows.csv") if r["keep"] != "1.0"]
    # 2 -> 64x3: u kept units hold 4u + 2u^2 of 8448 weights; 0.5 -> 45 units, 0.1 -> 20 units
    expected = {"0.5": 1 - (4 * 45 + 2 * 45 ** 2) / 8448, "0.1": 1 - (4 * 20 + 2 * 20 ** 2) / 8448}
    assert {r["keep"]: float(r["sparsity"]) for r in rows} == pytest.approx(expected, abs=1e-9)
    assert all(math.isfinite(float(r["test_nll"])) for r in rows)


def test_sparse_flows_controls_tiny_run_prints_both_controls(capsys, load_bench):
    controls = load_bench("sparse_flows_controls")
    assert controls.main(["--tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    narrow = [line for line in out if line.startswith("dense 2 -> 2x3, 16 weights")]  # four 2x2 layers
    assert len(narrow) == 1 and "modes held" in narrow[0]
    retrained = [line for line in out if line.startswith("paper arch, unpruned, one round of")]
    assert len(retrained) == 3 and all("->" in line for line in retrained)
