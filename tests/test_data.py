import gzip
import shutil

import numpy as np
import pytest

from fmnist_cluster.data import FILES, DataError, find_data_dir, load_dataset, read_idx


@pytest.fixture(scope="module")
def real_dir():
    return find_data_dir(download=False)[1]


def test_real_files_load_with_study_shapes(real_dir):
    ds = load_dataset(real_dir, seed=0)
    assert ds.x_train.shape == (48000, 28, 28, 1) and ds.x_val.shape == (12000, 28, 28, 1)
    assert ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    # balanced classes: 6,000 per class in the 60k, 1,000 per class in test
    y_all = np.concatenate([ds.y_train, ds.y_val])
    assert np.bincount(y_all).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.split("train")[0].shape[0] == 60000 and ds.split("all")[0].shape[0] == 70000


def test_shuffle_is_seeded(real_dir):
    a, b, c = (load_dataset(real_dir, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_train, c.y_train)


def test_stratified_subset(real_dir):
    ds = load_dataset(real_dir, seed=0, subset=300)
    assert len(ds.y_train) == 300 and len(ds.y_test) == 300 and len(ds.y_val) == 75
    assert np.bincount(ds.y_train).tolist() == [30] * 10
    assert np.bincount(ds.y_test).tolist() == [30] * 10


def copy_with(real_dir, tmp_path, name, transform):
    for f in FILES:
        shutil.copy(real_dir / f, tmp_path / f)
    raw = gzip.open(real_dir / name).read()
    (tmp_path / name).write_bytes(transform(raw))
    return tmp_path


def test_truncated_file_is_a_clear_error(real_dir, tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    folder = copy_with(real_dir, tmp_path, name, lambda raw: gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(DataError, match=rf"{name}.*truncated or corrupt.*apt-get install dataset-fashion-mnist"):
        read_idx(folder / name)


def test_wrong_magic_is_a_clear_error(real_dir, tmp_path):
    name = "train-labels-idx1-ubyte.gz"
    folder = copy_with(real_dir, tmp_path, name, lambda raw: gzip.compress(b"\x00\x00\x08\x03" + raw[4:]))
    with pytest.raises(DataError, match=rf"{name}: IDX magic 0x803, expected 0x801"):
        read_idx(folder / name)


def test_flipped_pixel_fails_the_checksum(real_dir, tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    folder = copy_with(real_dir, tmp_path, name, lambda raw: gzip.compress(raw[:-1] + bytes([raw[-1] ^ 1])))
    with pytest.raises(DataError, match="checksum mismatch"):
        read_idx(folder / name)


def test_missing_file_in_explicit_dir(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: file not found \(--data-dir"):
        find_data_dir(tmp_path)


def test_cli_data_reports_bad_dir_with_exit_2(run_fmc, tmp_path):
    res = run_fmc("data", "--data-dir", tmp_path)
    assert res.returncode == 2
    assert "file not found" in res.stderr and "Traceback" not in res.stderr
