"""Test setup: fixed seeds and, without a GPU, the Triton interpreter flag (so the Triton kernels
run on CPU tensors in CI)."""
import os
import random

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
