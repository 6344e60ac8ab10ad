"""MNIST and Fashion-MNIST loading, plus a small synthetic stand-in for tests and smoke runs.

Where :func:`load_mnist` (and :func:`load_fashion_mnist`, by the same rules) looks, in order:

1. ``data_dir`` if given, else the ``DFL_DATA_DIR`` environment variable. That folder must
   hold the four standard IDX files (gzipped or not) or, for MNIST, a Keras-layout
   ``mnist.npz``; if it holds neither, loading fails instead of quietly using other data,
   since a named folder means the user wants exactly that data.
2. Otherwise Keras's download cache (``$KERAS_HOME/datasets/mnist.npz``, or the IDX files
   in ``$KERAS_HOME/datasets/fashion-mnist/``; by default under ``~/.keras``), read with
   numpy so TensorFlow is not imported just to read a file.
3. Otherwise ``keras.datasets.mnist.load_data()`` (``fashion_mnist``), which downloads (needs
   network access).

Loaded data is cached per resolved file path, so several parties in one process share one
copy; arrays are therefore read-only. Copy before modifying in place.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from messages.errors import ConfigError, DataError
from messages.types import NDArray

ENV_VAR = "DFL_DATA_DIR"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NPZ_FILE = "mnist.npz"
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IDX_MAGICS = (IMAGES_MAGIC, LABELS_MAGIC, IMAGES_MAGIC, LABELS_MAGIC)
SIDE = 28
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Source:
    """One IDX data set: its name in messages, its ``.npz`` (if Keras keeps one), where
    Keras caches it under ``$KERAS_HOME/datasets`` and its ``keras.datasets`` module."""

    name: str
    npz: str | None
    cache: str
    keras: str


MNIST = Source("MNIST", NPZ_FILE, NPZ_FILE, "mnist")
FASHION_MNIST = Source("Fashion-MNIST", None, "fashion-mnist", "fashion_mnist")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits: ``x`` float32 in [0, 1] shaped (N, 28, 28, 1), ``y`` int64."""

    x_train: NDArray
    y_train: NDArray
    x_test: NDArray
    y_test: NDArray


def load_mnist(data_dir: str | None = None) -> Dataset:
    """MNIST from ``data_dir``, ``$DFL_DATA_DIR``, the Keras cache or a download, in that order.

    Raises ``DataError`` when a named folder lacks the files, a file is malformed, or no
    folder was named and the download fails; the message says which files to provide where.
    """
    return _load(MNIST, data_dir)


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017: 28x28 grey images of 10 kinds of clothing, the same
    IDX files and sizes as MNIST, and harder), by the same rules as :func:`load_mnist`."""
    return _load(FASHION_MNIST, data_dir)


def _load(source: Source, data_dir: str | None) -> Dataset:
    folder = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or None
    if folder is not None:
        return _load_folder(str(Path(folder).expanduser().resolve()), source)
    cached = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "datasets" / \
        source.cache
    if cached.is_file():
        return _load_npz(str(cached.resolve()))
    if cached.is_dir():
        return _load_folder(str(cached.resolve()), source)
    return _download(source)


def load_synthetic(num_train: int = 2000, num_test: int = 500, seed: int = 0,
                   num_classes: int = 10) -> Dataset:
    """A learnable MNIST-shaped data set, identical for equal arguments, built from numpy only.

    Each class is a fixed random sparse 28x28 template; samples add Gaussian noise and clip to
    [0, 1]. Classes are balanced (counts differ by at most one) and the order is shuffled.
    A small model separates the classes within an epoch, so tests can check that training
    actually learns without downloading MNIST.
    """
    if num_train < 1 or num_test < 1:
        raise ConfigError(f"num_train and num_test must be at least 1, got {num_train}, "
                          f"{num_test}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    templates = (rng.random((num_classes, SIDE, SIDE)) < 0.3).astype(np.float32)

    def draw(n: int) -> tuple[NDArray, NDArray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        noise = rng.normal(0.0, 0.3, size=(n, SIDE, SIDE)).astype(np.float32)
        x = np.clip(templates[y] + noise, 0.0, 1.0)[..., np.newaxis]
        return x, y

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    return _frozen(x_train, y_train, x_test, y_test)


def _wanted(source: Source) -> str:
    """The files a folder of ``source`` must hold, for error messages."""
    return f"the {source.name} IDX .gz files" + (f" or {source.npz}" if source.npz else "")


@functools.lru_cache(maxsize=8)
def _load_folder(folder: str, source: Source = MNIST) -> Dataset:
    """Read the IDX files in ``folder``, else its ``.npz``; cached per resolved path."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"data folder {folder} does not exist; pass --data-dir or set "
                        f"{ENV_VAR} to a folder with {_wanted(source)}")
    found = [f for f in (_find(path, name) for name in IDX_FILES) if f is not None]
    if len(found) == len(IDX_FILES):
        parsed = [_parse_idx(f, magic) for f, magic in zip(found, IDX_MAGICS, strict=True)]
        return _from_uint8(*parsed, source=folder)
    if source.npz and (path / source.npz).is_file():
        return _load_npz(str(path / source.npz))
    npz = f" or {source.npz}" if source.npz else ""
    raise DataError(f"no {source.name} data in {folder}: expected "
                    f"{', '.join(f + '.gz' for f in IDX_FILES)} (or without .gz){npz}; pass "
                    f"--data-dir or set {ENV_VAR} to such a folder")


@functools.lru_cache(maxsize=8)
def _load_npz(file: str) -> Dataset:
    """Read a Keras-layout ``mnist.npz`` (uint8 images, integer labels); cached per path."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = [npz[key] for key in ("x_train", "y_train", "x_test", "y_test")]
    except KeyError as exc:
        raise DataError(f"{file} lacks array {exc}; it needs x_train, y_train, x_test, y_test "
                        "as in keras.datasets.mnist") from exc
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {file} as an .npz archive ({exc}); replace the file") \
            from exc
    return _from_uint8(*arrays, source=file)


@functools.lru_cache(maxsize=2)
def _download(source: Source = MNIST) -> Dataset:
    """Fetch a data set through Keras; imported lazily so other paths never load TensorFlow."""
    try:
        import keras

        module = getattr(keras.datasets, source.keras)
        (x_train, y_train), (x_test, y_test) = module.load_data()
    except Exception as exc:
        raise DataError(f"could not download {source.name} ({exc}); pass --data-dir or set "
                        f"{ENV_VAR} to a folder with {_wanted(source)}") from exc
    return _from_uint8(x_train, y_train, x_test, y_test,
                       source=f"keras.datasets.{source.keras}")


def _find(folder: Path, name: str) -> Path | None:
    """``name.gz`` if present, else plain ``name``, else None."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _parse_idx(file: Path, magic: int) -> NDArray:
    """Decode an IDX images (N, 28, 28) or labels (N,) file; the header is big-endian uint32."""
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {file} ({exc}); replace it with an intact copy") from exc
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{file} is too short to be an IDX file ({len(raw)} bytes); replace it")
    found_magic, *dims = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=1 + ndim))
    if found_magic != magic:
        raise DataError(f"{file} has IDX magic {found_magic:#010x}, expected {magic:#010x}; "
                        "check that the file is the right one and not corrupt")
    if ndim == 3 and dims[1:] != [SIDE, SIDE]:
        raise DataError(f"{file} holds {dims[1]}x{dims[2]} images, expected {SIDE}x{SIDE}")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{file} has {len(raw) - header} data bytes but its header says "
                        f"{expected}; the file is truncated or corrupt, replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _from_uint8(x_train: NDArray, y_train: NDArray, x_test: NDArray, y_test: NDArray, *,
                source: str) -> Dataset:
    """Validate raw uint8 MNIST arrays and scale them into a read-only :class:`Dataset`."""
    xs, ys = [], []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (SIDE, SIDE):
            raise DataError(f"{source}: {split} images are {x.dtype} {x.shape}, expected uint8 "
                            f"(N, {SIDE}, {SIDE}) as in keras.datasets.mnist")
        if y.shape != (len(x),):
            raise DataError(f"{source}: {split} labels have shape {y.shape} for {len(x)} images;"
                            " the images and labels files do not belong together")
        if y.dtype.kind not in "iu" or (len(y) and not (y.min() >= 0 and y.max() < NUM_CLASSES)):
            raise DataError(f"{source}: {split} labels are not integers 0-{NUM_CLASSES - 1}; "
                            "the labels file is not MNIST")
        xs.append((x.astype(np.float32) / 255.0)[..., np.newaxis])
        ys.append(y.astype(np.int64))
    return _frozen(xs[0], ys[0], xs[1], ys[1])


def _frozen(x_train: NDArray, y_train: NDArray, x_test: NDArray, y_test: NDArray) -> Dataset:
    """A Dataset whose arrays are read-only, so a shared cached copy cannot be corrupted."""
    for a in (x_train, y_train, x_test, y_test):
        a.flags.writeable = False
    return Dataset(x_train, y_train, x_test, y_test)
