"""The pytest-benchmark suite in bench/ still runs: every case at tiny shapes
(``SPARSEODE_BENCH_QUICK=1``), checks only (``--benchmark-disable``), in a subprocess; and the
ratio tables of bench/conftest.py are computed from the benchmarks as pytest-benchmark records them."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def test_every_bench_case_passes_its_checks_at_tiny_shapes(tmp_path):
    env = dict(os.environ, SPARSEODE_BENCH_QUICK="1", OMP_NUM_THREADS="1",
               SPARSEODE_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-disable", "-q",
                             "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    # kernels 2 cases x 3 variants, e2e 5 log_prob + 4 train variants, compile 4 variants (1 field each)
    assert passed and int(passed.group(1)) == 19, result.stdout[-2000:]
    assert "failed" not in result.stdout and "skipped" not in result.stdout


def _bench_conftest():
    """bench/conftest.py as a module (it puts bench/ on sys.path for its cases: taken off again)."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("_bench_conftest", ROOT / "bench" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def _bench(group, variant, median, error=False):
    return SimpleNamespace(group=group, name=f"test[{variant}]", extra_info={"variant": variant},
                           stats=SimpleNamespace(median=median), has_error=error)


def test_ratio_tables_divide_the_dense_median_by_each_variant():
    conftest = _bench_conftest()
    benches = [_bench("g1", "dense", 4e-3), _bench("g1", "fast", 1e-3), _bench("g1", "slow", 8e-3),
               _bench("g2", "fast", 2e-3), _bench("g1", "broken", 1e-3, error=True)]
    table = conftest.ratios(benches)
    assert table["g1"]["dense"] == {"median_ms": 4.0, "vs_dense": 1.0}
    assert table["g1"]["fast"]["vs_dense"] == 4.0 and table["g1"]["slow"]["vs_dense"] == 0.5
    assert "broken" not in table["g1"]
    assert table["g2"] == {"fast": {"median_ms": 2.0}}  # no dense variant in the group: no ratio
    lines = conftest._tables(table)
    assert "| g1 | 4.000 | 1.000 | 8.000 | 4.00x | 0.50x |" in lines
    assert "| g2 | 2.000 | - |" in lines
