import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import sparseode.data as D


@pytest.mark.parametrize("name", sorted(D.TOY_DATASETS))
def test_toy_shape_dtype_seed_and_normalisation(name):
    x = D.toy(name, 20000, seed=0)
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    torch.testing.assert_close(D.toy(name, 20000, seed=0), x)
    assert not torch.equal(D.toy(name, 20000, seed=1), x)
    assert D.toy(name, 10, dtype=torch.float64).dtype == torch.float64
    # population normalisation: a large sample has mean ~0 and isotropic std ~1
    assert x.mean(0).abs().max() < 0.05
    iso = math.sqrt(float(((x - x.mean(0)) ** 2).sum(1).mean()) / 2)
    assert abs(iso - 1.0) < 0.03


def test_required_names_exist():
    for name in ["gaussians", "gaussians_spiral", "spirals", "8gaussians", "checkerboard", "2spirals", "moons",
                 "circles", "rings", "pinwheel", "swissroll"]:
        assert name in D.TOY_DATASETS


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown toy dataset name 'nope'"):
        D.toy("nope", 10)
    with pytest.raises(ValueError, match="n must"):
        D.toy("moons", 0)
    with pytest.raises(ValueError, match="not a mixture"):
        D.mixture("moons")


def test_gaussians_are_six_modes_on_radius_four_with_std_half():
    x = D.toy("gaussians", 30000, seed=0, normalize=False).double()
    angles = 2 * math.pi * torch.arange(6, dtype=torch.float64) / 6
    centres = 4 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    nearest = torch.cdist(x, centres).argmin(1)
    counts = torch.bincount(nearest, minlength=6)
    assert counts.min() > 4500  # ~5000 each
    for k in range(6):
        pts = x[nearest == k]
        assert (pts.mean(0) - centres[k]).norm() < 0.03
        assert abs(float(pts.std(0).mean()) - 0.5) < 0.02


def test_mixture_log_prob_matches_torch_distributions():
    for name in D.MIXTURES:
        mix = D.mixture(name)
        comp = torch.distributions.Independent(
            torch.distributions.Normal(torch.as_tensor(mix.means), torch.as_tensor(mix.stds)[:, None].expand(-1, 2)), 1)
        ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.as_tensor(mix.weights)), comp)
        x = torch.randn(500, 2, dtype=torch.float64) * 1.5
        torch.testing.assert_close(mix.log_prob(x), ref.log_prob(x))


@pytest.mark.parametrize("name", sorted(D.MIXTURES))
def test_mixture_density_integrates_to_one_and_matches_the_data(name):
    mix = D.mixture(name)
    g = torch.linspace(-4, 4, 401, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    mass = mix.log_prob(pts).exp().sum() * (8 / 400) ** 2
    assert abs(float(mass) - 1) < 1e-3
    # the sampled data has the normalised mixture's moments
    x = D.toy(name, 50000, seed=3).double()
    sampled, _ = mix.sample(50000, np.random.default_rng(0))
    assert np.allclose(x.mean(0).numpy(), sampled.mean(0), atol=0.03)
    assert np.allclose(x.std(0).numpy(), sampled.std(0), atol=0.03)


def test_entropy_floor_matches_closed_forms():
    # one Gaussian: H = d/2 log(2 pi e sigma^2)
    single = D.GaussianMixture(np.zeros((1, 2)), np.array([0.7]), np.ones(1))
    assert abs(single.entropy(200_000) - math.log(2 * math.pi * math.e * 0.49)) < 0.01
    # well separated equal-weight modes: H = log K + H(component), then minus d log(scale)
    raw = D.mixture("gaussians", normalize=False)
    h_raw = math.log(6) + math.log(2 * math.pi * math.e * 0.25)
    assert abs(raw.entropy(200_000) - h_raw) < 0.01
    _, scale = D.normalization("gaussians")
    assert abs(scale - math.sqrt((16 + 2 * 0.25) / 2)) < 1e-9  # trace(Cov) / d = (E|mu|^2 + d sigma^2) / d
    assert abs(D.true_entropy("gaussians") - (h_raw - 2 * math.log(scale))) < 0.01
    # and the true density's NLL on fresh data is the entropy (Monte Carlo consistency)
    x = D.toy("gaussians", 100_000, seed=5)
    assert abs(float(-D.mixture("gaussians").log_prob(x.double()).mean()) - D.true_entropy("gaussians")) < 0.02


def test_gaussians_spiral_layout():
    mix = D.mixture("gaussians_spiral", normalize=False)
    radii = np.linalg.norm(mix.means, axis=1)
    assert mix.n_modes == 10
    np.testing.assert_allclose(radii, np.linspace(4, 1, 10))
    np.testing.assert_allclose(mix.stds, np.linspace(0.3, 0.1, 10))


def test_classification_sets():
    for name in ["concentric", "moons", "spirals"]:
        x, y = D.classification(name, 1001, seed=0)
        assert x.shape == (1001, 2) and y.shape == (1001,) and y.dtype == torch.int64
        assert set(y.unique().tolist()) == {0, 1} and abs(int(y.sum()) - 500) <= 1
        x2, y2 = D.classification(name, 1001, seed=0)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = D.classification("concentric", 20000, seed=1)
    r = x.double().norm(dim=1)
    assert abs(float(r[y == 0].mean()) - 0.75) < 0.01 and abs(float(r[y == 1].mean()) - 1.5) < 0.01
    assert abs(float(r[y == 0].std()) - 0.1) < 0.01 and abs(float(r[y == 1].std()) - 0.1) < 0.01
    x0, _ = D.classification("concentric", 2000, noise=0.0)
    assert torch.allclose(torch.sort(x0.norm(dim=1)).values[[0, -1]], torch.tensor([0.75, 1.5]))
    with pytest.raises(ValueError, match="unknown classification dataset name"):
        D.classification("xor", 10)


def test_digits_plain_and_dequantised():
    x, y = D.digits()
    assert x.shape == (1797, 64) and y.shape == (1797,) and x.dtype == torch.float32
    assert torch.equal(x, x.round()) and x.min() == 0 and x.max() == 16
    assert torch.equal(y, torch.as_tensor(load_digits().target))
    xf, yf = D.digits(flow=True, seed=0, dtype=torch.float64)
    assert torch.equal(yf, y)
    assert xf.min() >= 0 and xf.max() < 1
    # dequantisation keeps the integer level: floor(x * 17) is the pixel value
    assert torch.equal(torch.floor(xf * D.DIGITS_LEVELS), x.double())
    assert not torch.equal(D.digits(flow=True, seed=1)[0], xf)
