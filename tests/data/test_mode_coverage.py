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


# ---- strict metric ---------------------------------------------------------------------------

def _merged(mix, i, j):
    """``mix`` with neighbours i and j replaced by one component at their midpoint (their summed weight)."""
    keep = [k for k in range(mix.n_modes) if k not in (i, j)]
    means = np.vstack([mix.means[keep], (mix.means[i] + mix.means[j]) / 2])
    return D.GaussianMixture(means, np.append(mix.stds[keep], mix.stds[i]),
                             np.append(mix.weights[keep], mix.weights[i] + mix.weights[j]))


def _dropped(mix, i):
    keep = [k for k in range(mix.n_modes) if k != i]
    return D.GaussianMixture(mix.means[keep], mix.stds[keep], mix.weights[keep])


def _draw(mix, n, seed):
    return torch.as_tensor(mix.sample(n, np.random.default_rng(seed))[0])


@pytest.mark.parametrize("name", ["gaussians", "8gaussians", "gaussians_spiral"])
def test_strict_true_mixture_passes_with_ratios_near_one(name):
    cov = D.mode_coverage(D.toy(name, 40000, seed=11), name)
    k = cov["n_modes"]
    assert cov["strict_ok"] and cov["modes_held"] == k
    np.testing.assert_allclose(cov["share_ratios"], np.ones(k), atol=0.08)
    # the true shares: w_k P(chi_2 <= 2) = w_k (1 - e^-2); the true off-mode share 1 - P(chi_2 <= 3) = e^-4.5
    np.testing.assert_allclose(cov["true_shares"], np.full(k, (1 - math.exp(-2)) / k), rtol=1e-12)
    assert cov["true_off_mode"] == pytest.approx(math.exp(-4.5), rel=1e-9)
    assert abs(cov["off_mode"] - math.exp(-4.5)) < 0.003
    np.testing.assert_allclose(np.array(cov["held_shares"]) / np.array(cov["true_shares"]), cov["share_ratios"])
    # the demo's sample count (2000) is enough for the 6-mode ring
    assert D.mode_coverage(D.toy("gaussians", 2000, seed=5), "gaussians")["strict_ok"]


@pytest.mark.parametrize("name", ["gaussians", "8gaussians"])
def test_strict_standard_normal_fails_though_lenient_captures_all(name):
    cov = D.mode_coverage(torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)), name)
    assert cov["modes_captured"] == cov["n_modes"]  # the lenient count is fooled
    assert not cov["strict_ok"] and cov["modes_held"] == 0
    assert max(cov["share_ratios"]) < 0.5 and cov["off_mode"] > 0.5


@pytest.mark.parametrize("name", ["gaussians", "8gaussians", "gaussians_spiral"])
def test_strict_merged_neighbours_fail_with_both_modes_below_80_percent(name):
    mix = D.mixture(name)
    cov = D.mode_coverage(_draw(_merged(mix, 1, 2), 20000, seed=1), name)
    ratios = np.array(cov["share_ratios"])
    assert not cov["strict_ok"] and cov["modes_held"] == mix.n_modes - 2
    assert np.all(ratios[[1, 2]] < 0.4)
    assert np.all(np.delete(ratios, [1, 2]) > 0.85)
    assert cov["off_mode"] > 0.05


@pytest.mark.parametrize("name", ["gaussians", "8gaussians", "gaussians_spiral"])
def test_strict_dropped_mode_reports_zero_share(name):
    mix = D.mixture(name)
    cov = D.mode_coverage(_draw(_dropped(mix, 2), 20000, seed=2), name)
    ratios = np.array(cov["share_ratios"])
    assert not cov["strict_ok"] and cov["modes_held"] == mix.n_modes - 1
    assert cov["held_shares"][2] < 1e-3 and ratios[2] < 0.01
    # the others share its weight: w = 1 / (K - 1) instead of 1 / K
    k = mix.n_modes
    np.testing.assert_allclose(np.delete(ratios, 2), np.full(k - 1, k / (k - 1)), atol=0.1)
    assert cov["off_mode"] < 0.02  # nothing off-mode: only the per-mode shares catch it


def test_strict_thresholds_decide_the_verdict():
    mix = D.mixture("gaussians")
    wide = D.GaussianMixture(mix.means, mix.stds * 1.4, mix.weights)  # every mode 40% too wide
    x = _draw(wide, 20000, seed=3)
    cov = D.mode_coverage(x, "gaussians")
    # core share of a 1.4x wider mode: (1 - exp(-2 / 1.96)) / (1 - exp(-2)) = 0.74; off-mode exp(-4.5 / 1.96)
    np.testing.assert_allclose(cov["share_ratios"], (1 - math.exp(-2 / 1.96)) / (1 - math.exp(-2)), atol=0.04)
    assert cov["off_mode"] == pytest.approx(math.exp(-4.5 / 1.96), abs=0.01)
    assert not cov["strict_ok"] and cov["modes_held"] == 0
    loose = D.mode_coverage(x, "gaussians", min_ratio=0.6, max_off_mode=0.2)
    assert loose["strict_ok"] and loose["min_ratio"] == 0.6 and loose["max_off_mode"] == 0.2
    assert not D.mode_coverage(x, "gaussians", min_ratio=0.6)["strict_ok"]  # off-mode 10% > 5%
    line = D.describe_modes(cov)
    assert line.startswith("strict modes: 0/6 hold >= 80% of their true share (lowest 0.7")
    assert f"off-mode {cov['off_mode']:.1%} (max 5.0%): FAIL; lenient 6/6 captured" in line


def test_strict_arguments_and_mixtures_without_separated_modes():
    x = D.toy("8gaussians", 500)
    for kwargs, err, msg in [
        ({"strict_radius": 0.0}, ValueError, "strict_radius must be > 0"),
        ({"strict_radius": float("nan")}, ValueError, "strict_radius must be finite"),
        ({"strict_radius": "3"}, TypeError, "strict_radius must be a real number"),
        ({"core_radius": 3.5}, ValueError, "core_radius must be <= 3.0"),
        ({"min_ratio": 0.0}, ValueError, "min_ratio must be > 0"),
        ({"min_ratio": 1.2}, ValueError, "min_ratio must be <= 1"),
        ({"max_off_mode": -0.1}, ValueError, "max_off_mode must be >= 0"),
        ({"max_off_mode": 0.005}, ValueError, "below the true mixture's own off-mode share"),
        ({"min_share": True}, TypeError, "min_share must be a real number"),
        ({"ks": (1.0, -2.0)}, ValueError, r"ks\[1\] must be > 0"),
        # 8gaussians' neighbours are 6.12 stds apart: their 3.5-std balls overlap
        ({"strict_radius": 3.5}, ValueError, r"overlap at strict_radius=3.5.*strict_radius <= 3.06"),
    ]:
        with pytest.raises(err, match=msg):
            D.mode_coverage(x, "8gaussians", **kwargs)
    assert D.mode_coverage(D.toy("gaussians", 500), "gaussians", strict_radius=3.9)["strict_radius"] == 3.9
    with pytest.raises(TypeError, match="floating point"):
        D.mode_coverage(torch.zeros(5, 2, dtype=torch.int64), "gaussians")
    with pytest.raises(ValueError, match="inf"):
        D.mode_coverage(torch.tensor([[0.0, float("inf")]]), "gaussians")
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        D.mode_coverage(torch.zeros(0, 2), "gaussians")
    for name in ("spirals", "checkerboard", "moons", "pinwheel"):  # not mixtures: no known modes
        with pytest.raises(ValueError, match="not a mixture dataset"):
            D.mode_coverage(D.toy(name, 50), name)
    with pytest.raises(TypeError, match="GaussianMixture"):
        D.mode_coverage(torch.zeros(5, 2), 3)
    touching = D.GaussianMixture(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([0.5, 0.5]), np.ones(2))
    with pytest.raises(ValueError, match="modes 0 and 1 of the mixture overlap"):
        D.mode_coverage(torch.zeros(5, 2), touching)
    zero_weight = D.GaussianMixture(np.array([[0.0, 0.0], [10.0, 0.0]]), np.ones(2), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="weight > 0"):
        D.mode_coverage(torch.zeros(5, 2), zero_weight)


def test_float32_numpy_and_float64_samples_give_the_same_result():
    x = D.toy("gaussians", 3000, seed=4, dtype=torch.float64)
    ref = D.mode_coverage(x, "gaussians")
    assert D.mode_coverage(x.numpy(), "gaussians") == ref
    assert D.mode_coverage(x.float(), "gaussians")["share_ratios"] == pytest.approx(ref["share_ratios"], abs=1e-3)
