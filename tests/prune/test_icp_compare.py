"""Smoke test of bench/icp_compare.py (tiny budget, JSON under tmp_path)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest


@pytest.mark.parametrize("schedule", ["geometric", "pq"])
def test_icp_compare_quick(tmp_path, capsys, schedule, load_bench):
    mod = load_bench("icp_compare")
    out = tmp_path / "cmp.json"
    png = tmp_path / "checks.png"
    rc = mod.main(["--quick", "--task", "clf", "--schedule", schedule, "--json", str(out), "--threads", "1",
                   "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["thresholds"] for r in res["results"]] == [None, [0.35, 1.0], [0.1, 0.5]]
    assert [r["rule"] for r in res["results"]] == ["imp", "discrepancy", "connectivity"]
    for r in res["results"]:
        assert r["final_sparsity"] == pytest.approx(0.95, abs=0.01)
        assert r["rounds"][-1]["final"] and r["rounds"][-1]["stop_reason"] == "budget"
        assert r["epochs"] <= res["results"][0]["epochs"] + 1e-9
    assert res["results"][0]["reasons"] == {"budget": res["results"][0]["n_rounds"]}
    assert "stop reasons" in capsys.readouterr().out


def _fake_run(path: Path, task: str, seed: int, results: dict[str, tuple[float, float, list[str]]]) -> str:
    """A JSON file shaped like icp_compare's output: results[rule] = (epochs, test, stop reasons)."""
    cfg = {"task": task, "schedule": "geometric", "seed": seed, "pq_eta": 0.0, "retrain_epochs": 2,
           "final_epochs": 4, "clf_retrain_epochs": 4, "clf_final_epochs": 8}
    res = [{"rule": rule, "epochs": ep, "wall_s": 1.0, "test": test, "reasons": dict(Counter(stops)),
            "rounds": [{"stop_reason": s} for s in stops]} for rule, (ep, test, stops) in results.items()]
    path.write_text(json.dumps({"config": cfg, "dense_test": 1.0, "results": res}))
    return str(path)


def test_icp_table_means_pairs_and_verdicts(tmp_path, capsys, load_bench):
    mod = load_bench("icp_table")
    files = [
        _fake_run(tmp_path / "a.json", "flow", 0, {"imp": (10.0, 1.50, ["budget", "budget"]),
                                                   "connectivity": (6.0, 1.52, ["consistent", "budget"])}),
        _fake_run(tmp_path / "b.json", "flow", 1, {"imp": (10.0, 1.40, ["budget", "budget"]),
                                                   "connectivity": (8.0, 1.44, ["recovered", "budget"])}),
        _fake_run(tmp_path / "c.json", "digits", 0, {"imp": (36.0, 90.0, ["budget"]),
                                                     "connectivity": (20.0, 88.0, ["recovered"])}),
    ]
    assert mod.main(files + ["--summary"]) == 0
    rows = {tuple(c.strip() for c in line.split("|")[1:5]): [c.strip() for c in line.split("|")[5:-1]]
            for line in capsys.readouterr().out.splitlines()[2:]}
    flow_conn = rows[("gaussians flow, 90%", "geometric", "2/4", "connectivity")]
    # seeds, mean epochs, saving vs IMP, mean ± sd of the test NLL, paired delta, reasons, verdict
    assert flow_conn[:2] == ["0,1", "7.00"]
    assert flow_conn[2] == "-30%"
    assert flow_conn[3] == "1.480 ± 0.057"
    assert flow_conn[4] == "+0.030"
    assert flow_conn[5] == "budget 2 cons 1 recov 1"
    assert flow_conn[6] == "met"  # 30% fewer epochs, +0.03 nats <= 0.05
    digits_conn = rows[("digits clf, 95%", "geometric", "4/8", "connectivity")]
    assert digits_conn[4] == "-2.000" and digits_conn[6] == "missed"  # 2 points below IMP > 0.5
    assert rows[("gaussians flow, 90%", "geometric", "2/4", "imp")][6] == ""
