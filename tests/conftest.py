"""Test setup: fixed seeds and the Triton interpreter flag (so Triton kernels run on CPU tensors)."""
import os

# Must be set before triton is first imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
