"""MNIST loads from IDX files or an npz in a named folder, and bad folders fail loudly."""

from __future__ import annotations

import gzip
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from messages.errors import DataError
from messages.types import NDArray
from worker import data
from worker.data import Dataset, load_fashion_mnist, load_mnist, load_synthetic

NUM_TRAIN, NUM_TEST = 20, 5


def images(n: int, offset: int) -> NDArray:
    """Distinct uint8 images so a mix-up of train and test would show."""
    return ((np.arange(n * 28 * 28) + offset) % 256).astype(np.uint8).reshape(n, 28, 28)


def labels(n: int) -> NDArray:
    return (np.arange(n) % 10).astype(np.uint8)


def write_idx(path: Path, data: NDArray, magic: int, compress: bool = True) -> None:
    """An IDX file as LeCun publishes it: big-endian magic and dimensions, then raw bytes."""
    raw = struct.pack(f">I{data.ndim}I", magic, *data.shape) + data.tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist_idx(folder: Path, compress: bool = True) -> None:
    write_idx(folder / "train-images-idx3-ubyte", images(NUM_TRAIN, 0), 0x803, compress)
    write_idx(folder / "train-labels-idx1-ubyte", labels(NUM_TRAIN), 0x801, compress)
    write_idx(folder / "t10k-images-idx3-ubyte", images(NUM_TEST, 7), 0x803, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels(NUM_TEST), 0x801, compress)


def write_npz(path: Path) -> None:
    """The layout of Keras's own ``mnist.npz`` download."""
    np.savez(path, x_train=images(NUM_TRAIN, 0), y_train=labels(NUM_TRAIN),
             x_test=images(NUM_TEST, 7), y_test=labels(NUM_TEST))


def assert_is_tiny_mnist(folder_data: Dataset) -> None:
    assert folder_data.x_train.shape == (NUM_TRAIN, 28, 28, 1)
    assert folder_data.x_test.shape == (NUM_TEST, 28, 28, 1)
    assert folder_data.x_train.dtype == np.float32
    assert folder_data.y_train.dtype == np.int64
    np.testing.assert_allclose(folder_data.x_train[..., 0], images(NUM_TRAIN, 0) / 255.0)
    np.testing.assert_allclose(folder_data.x_test[..., 0], images(NUM_TEST, 7) / 255.0)
    np.testing.assert_array_equal(folder_data.y_train, labels(NUM_TRAIN))
    np.testing.assert_array_equal(folder_data.y_test, labels(NUM_TEST))


def test_gzipped_idx_files_load_through_data_dir(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path)
    assert_is_tiny_mnist(load_mnist(str(tmp_path)))


def test_uncompressed_idx_files_load_too(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path, compress=False)
    assert_is_tiny_mnist(load_mnist(str(tmp_path)))


def test_idx_files_load_through_the_environment_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_idx(tmp_path)
    monkeypatch.setenv("DFL_DATA_DIR", str(tmp_path))
    assert_is_tiny_mnist(load_mnist())


def test_loading_one_folder_twice_shares_one_read_only_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_idx(tmp_path)
    first = load_mnist(str(tmp_path))
    monkeypatch.setenv("DFL_DATA_DIR", str(tmp_path))
    assert load_mnist() is first
    assert not first.x_train.flags.writeable


def test_a_keras_layout_npz_in_the_folder_loads(tmp_path: Path) -> None:
    write_npz(tmp_path / "mnist.npz")
    assert_is_tiny_mnist(load_mnist(str(tmp_path)))


def test_without_a_folder_the_keras_download_cache_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "datasets").mkdir()
    write_npz(tmp_path / "datasets" / "mnist.npz")
    monkeypatch.delenv("DFL_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert_is_tiny_mnist(load_mnist())


def test_a_failed_download_raises_data_error_naming_both_ways_to_fix_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> None:
        raise OSError("network unreachable")

    fake_keras = types.SimpleNamespace(
        datasets=types.SimpleNamespace(mnist=types.SimpleNamespace(load_data=offline)))
    monkeypatch.setitem(sys.modules, "keras", fake_keras)
    data._download.cache_clear()  # a real download earlier in this process would be reused
    monkeypatch.delenv("DFL_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(DataError, match="network unreachable") as caught:
        load_mnist()
    assert "--data-dir" in str(caught.value)
    assert "DFL_DATA_DIR" in str(caught.value)


def test_an_empty_folder_raises_data_error_naming_both_ways_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_mnist(str(tmp_path))
    message = str(caught.value)
    assert "--data-dir" in message
    assert "DFL_DATA_DIR" in message
    assert str(tmp_path.resolve()) in message
    assert "train-images-idx3-ubyte.gz" in message
    assert "\n" not in message


def test_a_missing_folder_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(str(tmp_path / "nowhere"))


def test_a_wrong_magic_number_raises_data_error(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels(NUM_TRAIN), 0x803)
    with pytest.raises(DataError, match="magic"):
        load_mnist(str(tmp_path))


def test_a_truncated_idx_file_raises_data_error(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        load_mnist(str(tmp_path))


def test_labels_that_do_not_match_the_images_raise_data_error(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels(NUM_TEST + 1), 0x801)
    with pytest.raises(DataError, match="do not belong together"):
        load_mnist(str(tmp_path))


def test_synthetic_data_is_mnist_shaped_scaled_and_deterministic() -> None:
    first = load_synthetic(num_train=60, num_test=20, seed=4)
    again = load_synthetic(num_train=60, num_test=20, seed=4)
    other = load_synthetic(num_train=60, num_test=20, seed=5)
    assert first.x_train.shape == (60, 28, 28, 1)
    assert first.x_test.shape == (20, 28, 28, 1)
    assert first.x_train.dtype == np.float32
    assert first.y_train.dtype == np.int64
    assert first.x_train.min() >= 0.0
    assert first.x_train.max() <= 1.0
    assert set(first.y_train.tolist()) == set(range(10))
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.x_train, other.x_train)


def test_fashion_mnist_loads_by_the_same_rules(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_idx(tmp_path)  # the same IDX format and sizes
    assert_is_tiny_mnist(load_fashion_mnist(str(tmp_path)))
    # Keras caches Fashion-MNIST as IDX files in datasets/fashion-mnist/
    home = tmp_path / "home"
    (home / "datasets" / "fashion-mnist").mkdir(parents=True)
    write_mnist_idx(home / "datasets" / "fashion-mnist")
    monkeypatch.delenv("DFL_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(home))
    assert_is_tiny_mnist(load_fashion_mnist())
    (tmp_path / "empty").mkdir()
    write_npz(tmp_path / "empty" / "mnist.npz")
    with pytest.raises(DataError, match="no Fashion-MNIST data") as caught:
        load_fashion_mnist(str(tmp_path / "empty"))  # an MNIST .npz is not Fashion-MNIST
    assert "mnist.npz" not in str(caught.value).split(":")[-1]
