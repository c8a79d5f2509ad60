import numpy as np
import pytest

from toolchain.core.errors import ToolchainError
from toolchain.data.sources import HAPT_TEST_USERS, default_target_subjects, load_data, load_hapt, load_npz, load_watch
from toolchain.data.windows import fit_standardization, sliding_windows, split_subjects, time_split


def test_sliding_windows_half_overlap():
    sig = np.arange(300 * 2, dtype=np.float32).reshape(300, 2)
    w = sliding_windows(sig)
    assert w.shape == (3, 2, 128)  # starts 0, 64, 128
    np.testing.assert_array_equal(w[1, 0], sig[64:192, 0])
    assert sliding_windows(sig[:100]).shape == (0, 2, 128)


def test_watch_dataset_is_real_and_complete():
    ds = load_watch()
    assert ds.X.shape[1:] == (6, 128) and ds.X.dtype == np.float32
    assert ds.subjects() == list(range(1, 11))
    assert ds.classes == ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"]
    assert set(np.unique(ds.y)) == set(range(7))
    assert default_target_subjects(ds) == (8, 9, 10)


def test_hapt_loader_on_real_data(hapt_dir):
    ds = load_hapt(hapt_dir)
    assert ds.subjects() == list(range(1, 31))
    assert ds.classes[0] == "WALKING" and len(ds.classes) == 6
    assert 9000 < len(ds) < 12000
    assert set(default_target_subjects(ds)) == set(HAPT_TEST_USERS)
    # accelerometer in g: the mean magnitude of a static window is about 1
    lay = ds.X[ds.y == 5][:50, :3]
    assert 0.8 < np.linalg.norm(lay.mean(axis=2), axis=1).mean() < 1.2


def test_time_split_keeps_order_and_gap():
    ds = load_watch()
    _, tgt = split_subjects(ds, (9,))
    adapt, test = time_split(tgt, 0.8)
    assert len(adapt) + len(test) + len(np.unique(tgt.segment)) == len(tgt)
    assert set(np.unique(adapt.y)) == set(np.unique(test.y))  # every activity on both sides
    seg = tgt.segment[0]
    n = int(np.sum(tgt.segment == seg))
    first_test = test.X[test.segment == seg][0]
    np.testing.assert_array_equal(first_test, tgt.X[tgt.segment == seg][int(np.floor(0.8 * n)) + 1])


def test_standardization_fitted_on_source_only():
    ds = load_watch()
    src, _ = split_subjects(ds, (8, 9, 10))
    mean, std = fit_standardization(src)
    z = (src.X - mean[None, :, None]) / std[None, :, None]
    np.testing.assert_allclose(z.mean(axis=(0, 2)), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=(0, 2)), 1, atol=1e-3)


def test_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, X=rng.standard_normal((10, 6, 128)), y=np.arange(10) % 3, subject=np.arange(10) // 5)
    ds = load_npz(path)
    assert len(ds) == 10 and ds.classes == ["0", "1", "2"] and ds.subjects() == [0, 1]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: (p / "RawData").mkdir() or str(p), "not a HAPT folder"),
        (lambda p: str(p / "nothing.npz"), "does not exist"),
        (lambda p: "csv:whatever", "unknown data spec"),
        (lambda p: np.savez(p / "x.npz", X=np.zeros((2, 6, 128))) or str(p / "x.npz"), "needs arrays X, y and subject"),
        (
            lambda p: (
                np.savez(p / "o.npz", X=np.array([None, 1], dtype=object), y=[0, 1], subject=[0, 0]) or str(p / "o.npz")
            ),
            "pickled arrays are refused",
        ),
    ],
)
def test_bad_data_specs(tmp_path, make, message):
    with pytest.raises(ToolchainError, match=message):
        load_data(make(tmp_path))


def test_unknown_target_subject():
    with pytest.raises(ToolchainError, match="target subjects are not in the data"):
        split_subjects(load_watch(), (99,))
