"""Make the shared helpers of tests/prune importable as ``prune_helpers``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
