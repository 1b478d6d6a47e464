"""`sparseode prune --sparse/--schedule/--min-density`: the cascade's options from the command line."""
from __future__ import annotations

import json

import pytest

import sparseode as so
from sparseode import cli
from sparseode.nn import fused_field


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert cli.main(["train", "--hidden", "8", "8", "--epochs", "1", "--out", str(out)]) == 0
    return out / "model.pt"


@pytest.mark.skipif(not fused_field.op_available()[0], reason="sparseode._C with the fused field op is not built")
@pytest.mark.parametrize("flag", ["on", "off", "auto"])
def test_prune_sparse_flag_and_preset(trained, tmp_path, flag):
    out = tmp_path / flag
    assert cli.main(["prune", "--checkpoint", str(trained), "--schedule", "sparse_flows_8", "--target", "0.7",
                     "--retrain-epochs", "1", "--sparse", flag, "--min-density", "0.2", "--out", str(out)]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["sparse"] == flag and record["schedule"] == "sparse_flows_8"
    rounds = record["rounds"]
    # sparse_flows_8 truncated at 70%: geometric 0.70 -> 0.10 down to keep 0.304, then 0.30
    assert [round(1 - r["target_sparsity"], 4) for r in rounds] == [0.7, 0.5301, 0.4015, 0.304, 0.3]
    forms = [r["sparse"] for r in rounds]
    if flag == "auto":  # masked while every layer is denser than 0.9, sparse after
        assert forms[-1] is True and forms == sorted(forms)
    else:
        assert forms == [flag == "on"] * 5
    pruned = so.load(out / "pruned.pt")
    assert so.prune.sparsity(pruned).total == pytest.approx(0.7, abs=0.01)
    assert all(float(m.weight_mask.float().mean()) >= 0.2 for m in pruned.modules() if hasattr(m, "weight_mask"))


def test_prune_bad_flags(trained, tmp_path, capsys):
    for argv in (["--sparse", "maybe"], ["--schedule", "sparse_flows_9"]):
        with pytest.raises(SystemExit):
            cli.main(["prune", "--checkpoint", str(trained), "--out", str(tmp_path), *argv])
        assert "invalid choice" in capsys.readouterr().err
