"""Smoke test of bench/icp_compare.py (tiny budget, JSON under tmp_path)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("schedule", ["geometric", "pq"])
def test_icp_compare_quick(tmp_path, capsys, schedule):
    mod = _load("icp_compare")
    out = tmp_path / "cmp.json"
    rc = mod.main(["--quick", "--task", "clf", "--schedule", schedule, "--json", str(out), "--threads", "1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["rule"] for r in res["results"]] == ["imp", "discrepancy", "connectivity"]
    for r in res["results"]:
        assert r["final_sparsity"] == pytest.approx(0.95, abs=0.01)
        assert r["rounds"][-1]["final"] and r["rounds"][-1]["stop_reason"] == "budget"
        assert r["epochs"] <= res["results"][0]["epochs"] + 1e-9
    assert res["results"][0]["reasons"] == {"budget": res["results"][0]["n_rounds"]}
    assert "stop reasons" in capsys.readouterr().out
