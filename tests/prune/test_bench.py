"""Smoke tests of bench/prune_flows.py and bench/icp.py (tiny budgets, outputs under tmp_path)."""
from __future__ import annotations

import json

import pytest


def test_prune_flows_quick(tmp_path, capsys, load_bench):
    pf = load_bench("prune_flows")
    rc = pf.main(["--quick", "--no-progress", "--methods", "magnitude,grasp", "--n-samples", "200",
                  "--out", str(tmp_path), "--threads", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["methods"]) == {"magnitude", "grasp"}
    for m in res["methods"].values():
        sp = [r["sparsity"] for r in m["rounds"]]
        assert sp == pytest.approx([0.5, 0.8], abs=1e-3)
    for f in ("nll_vs_sparsity.csv", "modes_vs_sparsity.csv", "nll_vs_sparsity.png", "modes_vs_sparsity.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "test NLL" in capsys.readouterr().out


def test_icp_quick(tmp_path, capsys, load_bench):
    icp = load_bench("icp")
    out = tmp_path / "icp.json"
    rc = icp.main(["--quick", "--no-progress", "--task", "clf", "--json", str(out),
                   "--threads", "1"])
    assert rc == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["icp"]["rounds"][-1]["stop_reason"] == "budget"
    assert res["icp"]["epochs"] <= res["base"]["epochs"]
    assert "epochs saved" in capsys.readouterr().out
