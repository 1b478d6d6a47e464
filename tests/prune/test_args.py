"""Numeric arguments of the pruning API: real numbers (not bools, strings or tensors), in range,
finite, integers where counted; every error names the argument."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparseode as so
from prune_helpers import batches, mlp, mse  # tests/prune/conftest.py puts it on the path
from sparseode.args import block_shape, check_sparsity, integer, real
from sparseode.prune.connectivity import connectivity
from sparseode.prune.pq import check_pq_params

NOT_REAL = ["0.5", True, False, None, torch.tensor(0.5), [0.5], 1 + 0j]


@pytest.mark.parametrize("bad", NOT_REAL)
def test_apply_refuses_a_sparsity_that_is_not_a_real_number(bad):
    model = mlp()
    with pytest.raises(TypeError, match="sparsity must be a real number"):
        so.prune.apply(model, "magnitude", bad)
    assert not hasattr(model[0], "weight_mask")  # refused before anything was pruned


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, math.inf, -math.inf])
def test_apply_refuses_a_sparsity_out_of_range_or_not_finite(bad):
    with pytest.raises(ValueError, match="sparsity"):
        so.prune.apply(mlp(), "magnitude", bad)


def _seeded_mlp():
    torch.manual_seed(0)
    return mlp()


def test_apply_takes_ints_and_numpy_scalars_as_the_same_sparsity():
    ref = so.prune.apply(_seeded_mlp(), "magnitude", 0.5)
    for s in (np.float64(0.5), np.float32(0.5)):
        got = so.prune.apply(_seeded_mlp(), "magnitude", s)
        assert so.prune.sparsity(got).total == so.prune.sparsity(ref).total == pytest.approx(0.5, abs=0.03)
        for a, b in zip(so.prune.masks(got).values(), so.prune.masks(ref).values()):
            assert torch.equal(a, b)
    assert so.prune.sparsity(so.prune.apply(mlp(), "magnitude", 0)).total == 0.0


@pytest.mark.parametrize("bad, exc, name", [
    ((4.0, 4), TypeError, r"block\[0\]"), ("4", TypeError, "block"), ((4,), TypeError, "block"),
    (True, TypeError, "block"), ((2, 0), ValueError, r"block\[1\]"), (-2, ValueError, r"block\[0\]"),
])
def test_block_must_be_positive_integers(bad, exc, name):
    with pytest.raises(exc, match=name):
        so.prune.apply(mlp((4, 4, 4)), "magnitude", 0.5, granularity="block", block=bad)


def test_block_accepts_an_int_or_a_pair_of_integers():
    assert block_shape(2) == (2, 2)
    assert block_shape((2, np.int64(4))) == (2, 4)
    assert block_shape([1, 3]) == (1, 3)


@pytest.mark.parametrize("kw, exc", [
    ({"n_batches": "2"}, TypeError), ({"n_batches": 2.0}, TypeError), ({"n_batches": True}, TypeError),
    ({"n_batches": 0}, ValueError),
])
def test_importance_counts_are_integers(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        so.prune.importance(mlp(), "snip", mse, batches(2), **kw)


def test_importance_seed_is_an_integer():
    with pytest.raises(TypeError, match="seed"):
        so.prune.importance(mlp(), "random", seed=1.5)


@pytest.mark.parametrize("kw, exc", [
    ({"n_iter": 0}, ValueError), ({"n_iter": "5"}, TypeError), ({"tol": 0}, ValueError),
    ({"tol": "1e-3"}, TypeError), ({"tol": math.nan}, ValueError), ({"n_hutchinson": -1}, ValueError),
    ({"n_hutchinson": 2.5}, TypeError), ({"n_batches": 0}, ValueError), ({"seed": "0"}, TypeError),
])
def test_hessian_spectrum_arguments(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        so.prune.hessian_spectrum(mlp(), mse, batches(1), **kw)


@pytest.mark.parametrize("kw, exc", [
    ({"patience": 1.5}, TypeError), ({"check_every": "10"}, TypeError), ({"min_steps": -1}, ValueError),
    ({"max_epochs": "3"}, TypeError), ({"max_epochs": 0}, ValueError), ({"max_epochs": math.inf}, ValueError),
    ({"steps_per_epoch": 0}, ValueError), ({"steps_per_epoch": 2.5}, TypeError),
    ({"eps_info": "0.1"}, TypeError), ({"eps_grad": math.nan}, ValueError), ({"n_steps": 0}, ValueError),
])
def test_icp_arguments(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        so.prune.ICP(probe=batches(1), **kw)


@pytest.mark.parametrize("kw, exc", [
    ({"tol_info": math.nan}, ValueError), ({"tol_grad": "1"}, TypeError), ({"seed": 0.5}, TypeError),
])
def test_discrepancy_measure_arguments(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        so.prune.ICP("discrepancy", probe=batches(1), **kw)


def test_connectivity_counts_are_integers():
    with pytest.raises(TypeError, match="n_steps"):
        connectivity(mlp(), batches(1), n_steps=2.0)
    with pytest.raises(ValueError, match="n_steps"):
        so.prune.gradient_flow(mlp(), mse, batches(1), n_steps=0)


@pytest.mark.parametrize("kw, exc", [
    ({"p": True}, TypeError), ({"q": "1"}, TypeError), ({"gamma": math.inf}, ValueError),
    ({"eta_r": math.nan}, ValueError), ({"beta": 0}, ValueError),
])
def test_pq_parameters(kw, exc):
    params = {"p": 1.0, "q": 2.0, "gamma": 1.0, "eta_r": 0.0, "beta": 0.9} | kw
    with pytest.raises(exc, match=next(iter(kw))):
        check_pq_params(**params)


def test_target_of_a_cascade_is_a_real_number():
    with pytest.raises(TypeError, match="target"):
        so.prune.default_schedule("0.9")
    with pytest.raises(TypeError, match="sparsity"):
        so.prune.one_shot(mlp(), None, "0.5")


def test_the_checks_themselves():
    assert real(3, "x") == 3.0 and isinstance(real(3, "x"), float)
    assert real(0.0, "x", low=0.0) == 0.0
    with pytest.raises(ValueError, match=r"x must be > 0.0"):
        real(0.0, "x", low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"x must be <= 1.0"):
        real(1.5, "x", high=1.0)
    assert check_sparsity(np.float64(0.25)) == 0.25
    assert integer(np.int32(7), "n") == 7 and isinstance(integer(np.int32(7), "n"), int)
    with pytest.raises(TypeError, match=r"n must be an integer, got 7.0 \(float\)"):
        integer(7.0, "n")
