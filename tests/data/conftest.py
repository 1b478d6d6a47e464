"""Model tests run tiny problems: one torch thread avoids oversubscribing the shared CPU cores."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
