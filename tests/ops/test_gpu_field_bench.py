"""bench/gpu_field.py and bench/gpu_run.sh run only on a GPU; here the script's rows, its table and
file naming, its refusal without a GPU, and the run script's syntax and step budget are checked."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_bench) -> ModuleType:
    return load_bench("gpu_field")


def test_dry_run_lists_every_field_density_and_batch(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 16 fields x 3 tasks" in out
    for name in ("toy64", "wide256", "wide1024", "power"):
        assert f"{name} d0.02 b10000: forward exact train" in out


def test_markdown_and_device_slug(bench: ModuleType) -> None:
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    rows = [{"field": "toy64", "density": 0.1, "batch": 1000, "task": "exact", "flop_ratio": 9.5, "status": "ok",
             "baseline_ms": 2.0, "fused_ms": 0.5, "speedup": 4.0, "rel_error": 1e-6},
            {"field": "toy64", "density": 0.1, "batch": 1000, "task": "train", "flop_ratio": 9.5,
             "status": "error: RuntimeError: boom"}]
    md = bench.markdown(rows, {"device": "X", "torch": "t", "triton": "3", "cuda": "12"})
    assert "| toy64 | 0.1 | 1000 | exact | 2.000 | 0.500 | 4.00x | 9.5 | ok |" in md
    assert "| toy64 | 0.1 | 1000 | train | - | - | - | 9.5 | error: RuntimeError: boom |" in md
    assert "4.00x" in bench.format_row(rows[0]) and "error" in bench.format_row(rows[1])


def test_bad_arguments_are_rejected(bench: ModuleType) -> None:
    for argv in (["--densities", "0"], ["--batches", "0"], ["--fields", "nope"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--fields", "toy64", "--densities", "0.1", "--batches", "8"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_run_script_parses_and_fits_eight_minutes() -> None:
    script = ROOT / "bench" / "gpu_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    limits = [int(m) for m in re.findall(r"^step \w+ (\d+) ", script.read_text(), flags=re.M)]
    assert len(limits) == 5 and sum(limits) + 5 * 5 < 8 * 60  # a step that overruns is killed 5 s later


@pytest.mark.parametrize("spec", ("toy64", "power"))
def test_tasks_agree_with_their_baselines_on_cpu(bench: ModuleType, spec: str) -> None:
    # the timed closures themselves (on the CPU op here): fused and baseline compute the same thing
    from sparseode.benchmark import FIELDS, make_fields
    from sparseode.nn.convert import sparsify

    _, pruned = make_fields(FIELDS[spec], 0.1)
    sparse = sparsify(pruned[0], format="csr")
    z = torch.randn(33, FIELDS[spec].dim)
    tasks = bench.make_tasks(pruned[0], sparse, z, torch.tensor(0.3))
    assert set(tasks) == set(bench.TASKS)
    for task, (base, fused) in tasks.items():
        want, got = base(), fused()
        assert bench._rel_error(got, want) < 1e-4, task
        if task == "exact":
            assert want[1].abs().max() > 0  # a real trace, not zeros


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("bash") is None,
                    reason="checks the run script's refusal without a GPU")
def test_run_script_refuses_without_a_gpu() -> None:
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU visible to torch" in done.stderr
