import subprocess
import sys

import numpy as np
import pytest
import torch

import sparseode.data as D
from sparseode.models import CNF, MLPVectorField

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_models_data_and_train_do_not_import_matplotlib():
    code = ("import sys, sparseode.models, sparseode.data, sparseode.train; "
            "bad = [m for m in ('matplotlib', 'triton') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_density_grid_evaluates_the_log_density_at_the_grid_points():
    from sparseode.plots import density_grid

    mix = D.mixture("gaussians")
    xs, ys, logp = density_grid(mix.log_prob, lim=(-3.0, 3.0, -2.0, 2.0), n=61)
    assert logp.shape == (61, 61) and xs[0] == -3 and ys[-1] == 2
    for i, j in [(0, 0), (10, 50), (30, 30), (60, 7)]:
        assert logp[i, j] == pytest.approx(float(mix.log_prob(torch.tensor([[xs[j], ys[i]]]))), rel=1e-6)
    _, _, wide = density_grid(mix, lim=3.0, n=301)  # objects with .log_prob work too
    assert np.exp(wide).sum() * (6 / 300) ** 2 == pytest.approx(1.0, abs=2e-3)


def test_plot_flow_and_samples_write_pngs(tmp_path):
    from sparseode.plots import plot_density, plot_flow, plot_samples

    torch.manual_seed(0)
    cnf = CNF(MLPVectorField(2, (8,)), rtol=1e-3, atol=1e-3)
    data = D.toy("gaussians", 500)
    p = plot_flow(cnf, data, tmp_path / "a" / "flow.png", n_samples=200, grid=20)
    w3, h3 = _png_size(p)
    p4 = plot_flow(cnf, data, tmp_path / "flow4.png", n_samples=200, grid=20, true_density=D.mixture("gaussians"))
    w4, h4 = _png_size(p4)
    assert h3 == h4 and w3 / h3 == pytest.approx(3, rel=0.05) and w4 / h4 == pytest.approx(4, rel=0.05)
    w, h = _png_size(plot_samples(data, tmp_path / "s.png", data=data))
    assert w / h == pytest.approx(2, rel=0.05)
    w, h = _png_size(plot_density(D.mixture("gaussians"), tmp_path / "d.png", grid=30))
    assert w == h
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        plot_samples(torch.zeros(5, 3), tmp_path / "bad.png")


def test_plot_training_curves(tmp_path):
    from sparseode.plots import plot_training

    history = [{"epoch": i, "loss": 2.0 / (i + 1), "val": 2.1 / (i + 1), "nfe": 20 + i} for i in range(5)]
    w, h = _png_size(plot_training(history, tmp_path / "curves.png"))
    assert w / h == pytest.approx(2, rel=0.05)  # loss panel and NFE panel
    w, h = _png_size(plot_training([{"epoch": 0, "loss": 1.0}], tmp_path / "one.png"))
    assert w == h
    with pytest.raises(ValueError, match="empty"):
        plot_training([], tmp_path / "none.png")
