"""Patterns are validated when a SparseWeight is built and when a state dict is loaded: every
malformed pattern is a PatternError naming the field and position, never a crash or a wrong
answer (the fuzz runs in a subprocess, so a segfault would fail the test instead of the run)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseode.ops import PatternError, SparseWeight
from sparseode.testing import backend_skip_reason


def _csr():
    w = torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 4, 0, 5]])
    return SparseWeight.from_dense(w, format="csr")


def _fields(sw):
    return {name: getattr(sw, name).clone() for name in sw.state_dict() if name != "values"}


def _rebuild(sw, **changes):
    fields = _fields(sw)
    fields.update(changes)
    return SparseWeight(sw.format, sw.shape, sw.values.detach(), fields)


def test_valid_patterns_pass_and_the_typed_pattern_names_its_fields():
    sw = _csr()
    assert sw.pattern._fields == ("crow", "col", "crow_t", "col_t", "perm")
    assert sw.pattern.crow.tolist() == [0, 2, 2, 5]
    assert _rebuild(sw).pattern.col.tolist() == [0, 2, 0, 1, 3]


@pytest.mark.parametrize("field,value,message", [
    ("crow", [0, 2, 1, 5], r"crow\[2\] = 1 < crow\[1\] = 2"),
    ("crow", [1, 2, 2, 5], r"crow\[0\] = 1, expected 0"),
    ("crow", [0, 2, 2, 4], r"crow\[3\] = 4 but col holds 5 entries"),
    ("crow", [0, 2, 5], r"crow has shape \(3,\), expected \(4,\)"),
    ("col", [0, 2, 0, 1, 4], r"col\[4\] = 4 is out of range \[0, 4\)"),
    ("col", [2, 0, 0, 1, 3], r"col\[1\] = 0 does not follow col\[0\] = 2 in row 0"),
    ("col", [0, 2, 1, 1, 3], r"col\[3\] = 1 does not follow col\[2\] = 1 in row 2"),
    ("perm", [0, 2, 3, 0, 4], r"perm is not a permutation"),
    ("perm", [0, 2, 3, 1, 9], r"perm\[4\] = 9 is out of range"),
    ("perm", [2, 0, 3, 1, 4], r"perm\[0\] = 2 points at entry"),
])
def test_corrupted_csr_fields_name_field_and_position(field, value, message):
    with pytest.raises(PatternError, match=message):
        _rebuild(_csr(), **{field: torch.tensor(value)})


def test_dtypes_devices_and_missing_fields_are_checked():
    sw = _csr()
    with pytest.raises(PatternError, match="crow must have dtype torch.int64, got torch.int32"):
        _rebuild(sw, crow=sw.crow.int())
    with pytest.raises(PatternError, match="csr pattern lacks perm"):
        fields = _fields(sw)
        del fields["perm"]
        SparseWeight("csr", sw.shape, sw.values.detach(), fields)
    with pytest.raises(PatternError, match="values has shape"):
        SparseWeight("csr", sw.shape, sw.values.detach()[:-1], _fields(sw))
    with pytest.raises(PatternError, match="values must be floating point"):
        SparseWeight("csr", sw.shape, sw.values.detach().long(), _fields(sw))


def test_bsr_block_sizes_must_tile_the_shape():
    w = torch.randn(8, 6)
    sw = SparseWeight.from_dense(w, format="bsr", block=(4, 3))
    assert sw.block == (4, 3)
    with pytest.raises(PatternError, match="blocks 3x3, which do not tile"):
        _rebuild(sw, block_mask=torch.ones(sw.values.shape[0], 3, 3, dtype=torch.bool))
    with pytest.raises(PatternError, match="block_mask must have dtype torch.bool"):
        _rebuild(sw, block_mask=sw.block_mask.float())
    with pytest.raises(PatternError, match=r"mask has shape \(8, 5\), expected \(8, 6\)"):
        SparseWeight("masked", (8, 6), w, {"mask": torch.ones(8, 5, dtype=torch.bool)})


@pytest.mark.parametrize("bad, exc, name", [
    ((16.0, 16), TypeError, r"block\[0\]"), ((4, 4.0), TypeError, r"block\[1\]"), (True, TypeError, "block"),
    ((True, 4), TypeError, r"block\[0\]"), ("4", TypeError, "block"), ((4,), TypeError, "block"),
    ((0, 4), ValueError, r"block\[0\]"), ((3, 4), ValueError, "does not tile"),
])
def test_bsr_block_argument_follows_the_one_rule_of_sparseode_args(bad, exc, name):
    """SparseWeight.from_dense, sparsify and prune.apply check ``block`` by one rule
    (sparseode.args.block_shape): an int or a pair of integers >= 1, floats and bools refused."""
    import sparseode as so

    w = torch.randn(8, 8)
    with pytest.raises(exc, match=name):
        SparseWeight.from_dense(w, format="bsr", block=bad)
    if not (isinstance(bad, tuple) and bad == (3, 4)):  # sparsify warns on a non-tiling block instead
        with pytest.raises(exc, match=name):
            so.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), format="bsr", block=bad)
    assert SparseWeight.from_dense(w, format="bsr", block=4).block == (4, 4)


def test_corrupted_checkpoint_is_rejected_and_leaves_the_weight_as_it_was():
    sw = _csr()
    state = sw.state_dict()
    state["col"] = torch.tensor([0, 2, 0, 9, 3])
    target = _csr()
    before = target.to_dense().detach().clone()
    with pytest.raises(RuntimeError, match=r"saved csr pattern is malformed: col\[3\] = 9 is out of range"):
        target.load_state_dict(state)
    assert torch.equal(target.to_dense(), before)


def test_fuzz_of_corrupted_patterns_and_checkpoints_in_a_subprocess():
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    script = Path(__file__).with_name("fuzz_patterns.py")
    done = subprocess.run([sys.executable, str(script), "400"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum(counts.values()) == 800
    assert counts["construct_rejected"] > 300 and counts["load_rejected"] > 300, counts
