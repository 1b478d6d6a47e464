import math

import numpy as np
import pytest
import torch

import sparseode.data as D


def test_true_samples_capture_every_mode_and_follow_the_chi_distribution():
    x = D.toy("gaussians", 30000, seed=7)
    cov = D.mode_coverage(x, "gaussians", ks=(0.5, 1.0, 2.0, 3.0))
    assert cov["n_modes"] == 6 and cov["modes_captured"] == 6 and all(cov["captured"])
    # the Mahalanobis radius of a 2-D Gaussian: P(r <= k) = 1 - exp(-k^2 / 2)
    for k, share in zip(cov["ks"], cov["high_quality"]):
        assert abs(share - (1 - math.exp(-k * k / 2))) < 0.01, k
    np.testing.assert_allclose(cov["mode_shares"], np.full(6, 1 / 6), atol=0.01)


def test_a_missing_mode_is_reported():
    mix = D.mixture("gaussians")
    x, labels = mix.sample(6000, np.random.default_rng(0))
    keep = labels != 2
    cov = D.mode_coverage(torch.as_tensor(x[keep]), "gaussians")
    assert cov["modes_captured"] == 5
    assert cov["captured"] == [True, True, False, True, True, True]
    assert cov["counts"][2] == 0


def test_collapsed_or_spread_samples_are_low_quality():
    centre = torch.zeros(1000, 2)  # all mass at the origin: ~8 component stds from every mode
    cov = D.mode_coverage(centre, "gaussians")
    assert cov["modes_captured"] == 0 and cov["high_quality"][cov["ks"].index(3.0)] == 0.0
    # a standard normal (the untrained flow) puts only a small share near the modes
    cov = D.mode_coverage(torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)), "gaussians")
    assert cov["high_quality"][cov["ks"].index(1.0)] < 0.15


def test_other_mixtures_and_arguments():
    x = D.toy("gaussians_spiral", 20000, seed=1)
    cov = D.mode_coverage(x, "gaussians_spiral")
    assert cov["n_modes"] == 10 and cov["modes_captured"] == 10
    assert D.mode_coverage(D.toy("8gaussians", 8000), D.mixture("8gaussians"))["modes_captured"] == 8
    assert D.DEFAULT_KS[0] == 0.25 and D.DEFAULT_KS[-1] == 20
    with pytest.raises(ValueError, match=r"samples must have shape \(n, 2\)"):
        D.mode_coverage(torch.zeros(5, 3), "gaussians")
    with pytest.raises(ValueError, match="NaN"):
        D.mode_coverage(torch.full((5, 2), float("nan")), "gaussians")
    with pytest.raises(ValueError, match="not a mixture"):
        D.mode_coverage(torch.zeros(5, 2), "moons")
