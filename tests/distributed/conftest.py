"""Data-parallel tests on 2 CPU ranks (gloo, torch.multiprocessing spawn) against one process.

The ranks start once per session (spawning costs seconds) and run every scenario of
ddp_scenarios.py in turn; the tests compare what each rank returned with a single-process run. The
process group has a short timeout, so a regression that makes the ranks wait on each other fails
instead of hanging CI. This folder goes on sys.path so that the tests and the spawned ranks import
ddp_scenarios by name; tests run single-threaded.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from ddp_scenarios import run_iterative, spawn_ranks  # noqa: E402 - needs the path above


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def single_killed_run(tmp_path_factory) -> str:
    """A single-process run's checkpoint folder, killed in its second round (resumed on 2 ranks)."""
    ckpt = tmp_path_factory.mktemp("single") / "ckpt"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_iterative(str(ckpt), fail_at=2)
    except KeyboardInterrupt:
        pass
    finally:
        torch.set_num_threads(n)
    assert sorted(p.name for p in ckpt.glob("round_*.pt")) == ["round_00.pt"]  # killed in round 1
    return str(ckpt)


@pytest.fixture(scope="session")
def ranks(tmp_path_factory, single_killed_run) -> list[dict]:
    """Every scenario's result on each of the 2 ranks (spawned once per session)."""
    return spawn_ranks(tmp_path_factory.mktemp("ranks"), single_killed_run)
