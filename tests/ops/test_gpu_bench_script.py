"""bench/gpu_kernels.py runs only on a GPU; here its argument parsing, row generation and writers
are exercised through --dry-run, and its refusal without a GPU is checked."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_bench) -> ModuleType:
    return load_bench("gpu_kernels")


def test_default_rows_cover_the_issue_grid(bench: ModuleType) -> None:
    args = bench.parse_args([])
    rows = bench.configs(args)
    assert len(rows) == 2 * 2 * 4 * 2 * 2
    assert {r.hidden for r in rows} == {1024, 4096}
    assert {r.batch for r in rows} == {4096, 16384}
    assert {r.density for r in rows} == {0.5, 0.2, 0.1, 0.05}
    assert {(r.structure, r.format) for r in rows} == {("unstructured", "csr"), ("block32", "bsr")}
    assert {r.dtype for r in rows} == {"float16", "float32"}
    assert tuple(args.methods) == ("dense", "torch_csr", "torch_bsr", "triton", "cuda")
    assert len(set(rows)) == len(rows)


def test_dry_run_lists_rows_and_writes_json_and_csv(bench: ModuleType, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_csv = tmp_path / "rows.json", tmp_path / "rows.csv"
    code = bench.main(["--hidden", "64", "--batch", "8", "16", "--densities", "0.1", "--dtypes", "float32",
                       "--dry-run", "--json", str(out_json), "--csv", str(out_csv)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dry run: 4 rows x 5 methods" in printed
    assert "h64 b16 d0.1 block32 float32 [bsr]" in printed
    data = json.loads(out_json.read_text())
    assert set(data["environment"]) >= {"torch", "triton"}
    assert len(data["results"]) == 4 * 5
    assert {r["status"] for r in data["results"]} == {"dry-run"}
    with out_csv.open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 20 and {"hidden", "method", "time_ms", "speedup_vs_dense"} <= set(table[0])


def test_bad_arguments_are_rejected(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--densities", "1.5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--hidden", "100"])  # not a multiple of the 32x32 block


def test_table_reports_times_and_speedups(bench: ModuleType) -> None:
    cfg = bench.Config(1024, 4096, 0.1, "block32", "float16")
    results = [bench.Result(cfg, "dense", "ok", time_ms=2.0, speedup_vs_dense=1.0),
               bench.Result(cfg, "triton", "ok", time_ms=0.5, speedup_vs_dense=4.0),
               bench.Result(cfg, "cuda", "unavailable: not built")]
    text = bench.table(results, ("dense", "triton", "cuda"))
    assert "0.500ms (4.00x)" in text and "unavailable" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_to_time_without_a_gpu(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--hidden", "64", "--batch", "8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
