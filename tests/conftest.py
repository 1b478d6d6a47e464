"""Test setup: fixed seeds and, without a GPU, the Triton interpreter flag (so the Triton kernels
run on CPU tensors in CI)."""
import importlib.util
import os
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest
import torch

# Must be set before triton is first imported anywhere; on a GPU the real kernels are tested.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread, for suites of tiny problems (training loops) where a thread pool only adds
    synchronisation. Kernel tests keep the default so multi-threaded splits are exercised."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _format_cache_in_tmp(tmp_path_factory):
    """format="auto" caches its measured choices on disk: keep the tests' cache out of $HOME."""
    old = os.environ.get("SPARSEODE_CACHE_DIR")
    os.environ["SPARSEODE_CACHE_DIR"] = str(tmp_path_factory.mktemp("sparseode-cache"))
    yield
    if old is None:
        os.environ.pop("SPARSEODE_CACHE_DIR", None)
    else:
        os.environ["SPARSEODE_CACHE_DIR"] = old


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _load_bench(name: str) -> ModuleType:
    """A fresh copy of the script bench/<name>.py as a module. bench/ is on sys.path while it loads
    (the scripts import their siblings), and the module is registered in sys.modules under
    ``_bench_<name>`` (dataclasses look their module up while it loads)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
    return module


@pytest.fixture(scope="session")
def load_bench() -> Callable[[str], ModuleType]:
    """``load_bench(name)``: the benchmark script bench/<name>.py as a module."""
    return _load_bench
