"""Make the shared helpers of tests/prune importable as ``prune_helpers``; run single-threaded.

The tiny models here are overhead-bound, and on a small shared machine intra-op threads only add
spin-waiting (a 2-thread run under load was measured 20x slower than a 1-thread run).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
