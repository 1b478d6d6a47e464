"""Model tests run tiny problems: one torch thread avoids oversubscribing the shared CPU cores."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
