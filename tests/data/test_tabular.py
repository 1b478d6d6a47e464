"""MAF tabular loaders on small files written here in the release's layout."""
import numpy as np
import pytest
import torch

from sparseode.data import tabular


def _corr(a, b):
    return float(np.corrcoef(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))[0, 1])


def test_power_split_columns_noise_and_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(1000, 8)) * 100 + np.arange(8) * 1000
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    assert tabular("power", tmp_path)[0].dtype == torch.float32
    train, val, test = tabular("power", tmp_path, dtype=torch.float64)
    assert (train.shape, val.shape, test.shape) == ((810, 6), (90, 6), (100, 6))
    both = torch.cat([train, val]).double()
    torch.testing.assert_close(both.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(both.std(0, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    # rows are shuffled by RandomState(42) and columns 1 and 3 are dropped
    perm = np.arange(1000)
    np.random.RandomState(42).shuffle(perm)
    shuffled = raw[perm][:, [0, 2, 4, 5, 6, 7]]
    full = torch.cat([train, val, test]).double().numpy()
    for j in range(6):
        assert _corr(full[:, j], shuffled[:, j]) > 0.9999
    # uniform noise of width 0.001 (gap), 0.01 (voltage), 1 (sub-metering), none on time
    assert _corr(full[:, 5], shuffled[:, 5]) > 1 - 1e-10
    for j, width in [(0, 0.001), (1, 0.01), (2, 1.0), (3, 1.0), (4, 1.0)]:
        slope, icpt = np.polyfit(shuffled[:, j], full[:, j], 1)
        noise = (full[:, j] - slope * shuffled[:, j] - icpt) / slope
        assert 0.9 * width < noise.max() - noise.min() < 1.05 * width, j


def test_miniboone_tail_split_and_train_val_normalisation(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(500, 43)) * 3 + 7
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    train, val, test = tabular("MiniBooNE", tmp_path, dtype=torch.float64)
    stack = raw[:450]
    mu, s = stack.mean(0), stack.std(0)
    np.testing.assert_allclose(train.numpy(), (raw[:405] - mu) / s)
    np.testing.assert_allclose(val.numpy(), (raw[405:450] - mu) / s)
    np.testing.assert_allclose(test.numpy(), (raw[450:] - mu) / s)


def _write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(f"{v:.17g}" for v in r) + "\n")


def test_hepmass_signal_rows_feature_removal_and_splits(tmp_path):
    rng = np.random.default_rng(2)
    header = ["# label", "f0", "f1", "f2", "f3", "f4", "mass"]

    def table(n):
        label = (np.arange(n) % 2 == 0).astype(float)
        cont = rng.normal(size=(n, 4)) * [1, 2, 3, 4] + [0, 1, 2, 3]
        discrete = rng.integers(-1, 2, size=(n, 1)).astype(float)  # min value recurs -> removed
        mass = np.full((n, 1), 1000.0)  # constant -> removed
        return np.hstack([label[:, None], cont, discrete, mass])

    tr, te = table(300), table(80)
    (tmp_path / "hepmass").mkdir()
    _write_csv(tmp_path / "hepmass" / "1000_train.csv", header, tr)
    _write_csv(tmp_path / "hepmass" / "1000_test.csv", header, te)
    train, val, test = tabular("hepmass", tmp_path, dtype=torch.float64)
    sig_tr = tr[tr[:, 0] == 1][:, 1:5]
    sig_te = te[te[:, 0] == 1][:, 1:5]
    mu, s = sig_tr.mean(0), sig_tr.std(0, ddof=1)
    assert (train.shape, val.shape, test.shape) == ((135, 4), (15, 4), (40, 4))
    np.testing.assert_allclose(torch.cat([train, val]).numpy(), (sig_tr - mu) / s, rtol=1e-8)
    np.testing.assert_allclose(val.numpy(), ((sig_tr - mu) / s)[-15:], rtol=1e-8)
    np.testing.assert_allclose(test.numpy(), (sig_te - mu) / s, rtol=1e-8)


def test_gas_drops_correlated_columns_and_normalises(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(3)
    n = 400
    base = rng.normal(size=(n, 4))
    frame = pd.DataFrame({
        "Time": np.arange(n, dtype=float), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n),
        "s1": base[:, 0], "s2": 2 * base[:, 0] + 0.001 * rng.normal(size=n),  # corr > 0.98 with s1
        "s3": base[:, 1], "s4": base[:, 2], "s5": base[:, 3],
    })
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    train, val, test = tabular("gas", tmp_path, dtype=torch.float64)
    kept = frame[["s2", "s3", "s4", "s5"]].to_numpy()  # s1 is the first of the correlated pair: dropped
    expected = (kept - kept.mean(0)) / kept.std(0, ddof=1)
    assert (train.shape, val.shape, test.shape) == ((324, 4), (36, 4), (40, 4))
    np.testing.assert_allclose(torch.cat([train, val, test]).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_bsds300_reads_the_three_datasets(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(4)
    parts = {"train": rng.normal(size=(50, 63)), "validation": rng.normal(size=(10, 63)), "test": rng.normal(size=(20, 63))}
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, v in parts.items():
            f.create_dataset(k, data=v)
    out = tabular("BSDS300", tmp_path, dtype=torch.float64)
    for got, key in zip(out, ["train", "validation", "test"]):
        np.testing.assert_array_equal(got.numpy(), parts[key])


def test_missing_file_error_names_the_file(tmp_path):
    (tmp_path / "hepmass").mkdir()
    _write_csv(tmp_path / "hepmass" / "1000_train.csv", ["# label", "f0"], [[1, 0.5]])
    with pytest.raises(FileNotFoundError, match=r"hepmass/1000_test\.csv"):
        tabular("hepmass", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"power/data\.npy"):
        tabular("power", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"BSDS300/BSDS300\.hdf5"):
        tabular("bsds300", tmp_path)


def test_root_from_environment_and_data_subfolder(tmp_path, monkeypatch):
    raw = np.random.default_rng(5).normal(size=(100, 43))
    (tmp_path / "data" / "miniboone").mkdir(parents=True)
    np.save(tmp_path / "data" / "miniboone" / "data.npy", raw)
    monkeypatch.setenv("SPARSEODE_DATA", str(tmp_path))
    train, val, test = tabular("miniboone")
    assert (train.shape[0], val.shape[0], test.shape[0]) == (81, 9, 10)
    monkeypatch.delenv("SPARSEODE_DATA")
    with pytest.raises(FileNotFoundError, match="SPARSEODE_DATA"):
        tabular("miniboone")
    with pytest.raises(ValueError, match="unknown tabular dataset name 'cifar'"):
        tabular("cifar", tmp_path)
