"""Fashion-MNIST: find, read, verify, normalise and split the four IDX files.

No Keras here: the files are read with numpy, so that the data layer works (and is tested) without
any deep-learning backend, and so that Ray can ship the arrays to trials without importing one.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The official files, the same location and names that keras.datasets.fashion_mnist uses.
DOWNLOAD_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# name -> (IDX magic, shape, sha256 of the decompressed file). Checking the decoded bytes, not the
# .gz, accepts any faithful re-compression (Debian's package, a mirror) and rejects anything else.
FILES = {
    "train-images-idx3-ubyte.gz": (
        0x803, (60000, 28, 28), "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte.gz": (
        0x801, (60000,), "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte.gz": (
        0x803, (10000, 28, 28), "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte.gz": (
        0x801, (10000,), "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
HOW_TO_GET = (
    "Get good copies with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_DIR}) or download the four files from {DOWNLOAD_URL}, then point "
    "--data-dir or FMC_DATA_DIR at their folder."
)
N_VAL = 12000  # the study's 48,000 / 12,000 split of the 60,000 training images
N_TRAIN, N_TEST = 60000 - N_VAL, 10000


class DataError(Exception):
    """A data file is missing, truncated or corrupt; the message names the file and the fix."""


def keras_cache_dir() -> Path:
    """Where keras.datasets.fashion_mnist caches the files (honours KERAS_HOME)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets" / "fashion-mnist"


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The folders searched, in order, each with the reason it is searched."""
    dirs = []
    if data_dir:
        dirs.append(("--data-dir", Path(data_dir)))
    elif os.environ.get("FMC_DATA_DIR"):
        dirs.append(("FMC_DATA_DIR", Path(os.environ["FMC_DATA_DIR"])))
    dirs += [("Debian dataset-fashion-mnist", DEBIAN_DIR), ("Keras cache", keras_cache_dir())]
    return dirs


def find_data_dir(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> tuple[str, Path]:
    """Return (source, folder) of the first folder holding all four files.

    An explicit ``data_dir`` (or ``FMC_DATA_DIR``) that lacks a file is an error rather than a reason
    to look elsewhere: the user asked for that folder. With none given and no local copy, the files
    are downloaded into the Keras cache when ``download`` is true.
    """
    dirs = candidate_dirs(data_dir)
    explicit = data_dir or os.environ.get("FMC_DATA_DIR")
    for source, folder in dirs:
        missing = [name for name in FILES if not (folder / name).is_file()]
        if not missing:
            return source, folder
        if explicit and source in ("--data-dir", "FMC_DATA_DIR"):
            raise DataError(f"{folder / missing[0]}: file not found ({source} names this folder). {HOW_TO_GET}")
    if not download:
        raise DataError(f"Fashion-MNIST not found in {', '.join(str(d) for _, d in dirs)}. {HOW_TO_GET}")
    return "downloaded", _download(keras_cache_dir())


def _download(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = folder / name
        if target.is_file():
            continue
        part = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(DOWNLOAD_URL + name, timeout=60) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            part.unlink(missing_ok=True)
            raise DataError(f"could not download {DOWNLOAD_URL + name}: {err}. {HOW_TO_GET}") from err
        part.rename(target)  # only complete files get the real name
    return folder


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file into a uint8 array, checking header, size and checksum."""
    magic, shape, sha256 = FILES[path.name]
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: not a readable gzip file ({err}); truncated or corrupt. {HOW_TO_GET}") from err
    ndim = len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header. {HOW_TO_GET}")
    got_magic = struct.unpack(">I", raw[:4])[0]
    if got_magic != magic:
        raise DataError(f"{path}: IDX magic {got_magic:#x}, expected {magic:#x}; not the right file. {HOW_TO_GET}")
    got_shape = struct.unpack(f">{ndim}I", raw[4:header])
    if got_shape != shape or len(raw) != header + int(np.prod(shape)):
        raise DataError(
            f"{path}: header says shape {got_shape} with {len(raw) - header} data bytes, "
            f"expected {shape}; truncated or wrong file. {HOW_TO_GET}")
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{path}: checksum mismatch; the file is corrupt or not Fashion-MNIST. {HOW_TO_GET}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def load_raw(folder: Path) -> dict[str, np.ndarray]:
    """The four verified uint8 arrays of one folder; cached, so a process reads them once."""
    arrays = {name: read_idx(folder / name) for name in FILES}
    for name, labels in arrays.items():
        if "labels" in name and labels.max() > 9:
            raise DataError(f"{folder / name}: label {labels.max()} outside 0..9")
    return arrays


@dataclass(frozen=True)
class Dataset:
    """Normalised, shuffled splits. Images (n, 28, 28, 1) float32 in [0, 1]; labels (n,) int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str = ""

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of an evaluation split.

        ``test``: the 10,000 test images (the study's choice); ``train``: the 60,000 training
        images (train + validation, the study's raw-train baseline); ``all``: all 70,000 images,
        as the clustering literature scores.
        """
        if name == "test":
            return self.x_test, self.y_test
        if name == "train":
            return np.concatenate([self.x_train, self.x_val]), np.concatenate([self.y_train, self.y_val])
        if name == "all":
            return (np.concatenate([self.x_train, self.x_val, self.x_test]),
                    np.concatenate([self.y_train, self.y_val, self.y_test]))
        raise ValueError(f"unknown split {name!r}; expected test, train or all")


def _stratified(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows with the classes as balanced as ``n`` allows, in shuffled order."""
    if n >= len(y):
        return x, y
    classes = np.unique(y)
    per_class = np.full(len(classes), n // len(classes))
    per_class[: n % len(classes)] += 1
    idx = np.concatenate([np.flatnonzero(y == c)[:k] for c, k in zip(classes, per_class)])
    idx = rng.permutation(idx)
    return x[idx], y[idx]


def load_dataset(data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                 subset: int | None = None) -> Dataset:
    """Load, normalise, shuffle (with ``seed``) and split Fashion-MNIST.

    Parameters
    ----------
    data_dir : folder of the four IDX files; searched as in :func:`find_data_dir` when None.
    seed : shuffling seed; the same seed gives the same splits.
    subset : keep a class-stratified ``subset`` images of train, ``subset // 4`` of validation
        and ``subset`` of test, for quick runs. None keeps everything (48,000 / 12,000 / 10,000).
    """
    source, folder = find_data_dir(data_dir)
    raw = load_raw(folder)
    rng = np.random.default_rng(seed)
    x = raw["train-images-idx3-ubyte.gz"]
    y = raw["train-labels-idx1-ubyte.gz"].astype(np.int64)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    xt = raw["t10k-images-idx3-ubyte.gz"]
    yt = raw["t10k-labels-idx1-ubyte.gz"].astype(np.int64)
    order = rng.permutation(len(yt))
    xt, yt = xt[order], yt[order]
    splits = [(x[N_VAL:], y[N_VAL:]), (x[:N_VAL], y[:N_VAL]), (xt, yt)]
    if subset is not None:
        splits = [_stratified(xs, ys, n, rng) for (xs, ys), n in zip(splits, split_sizes(subset))]
    # (n, 28, 28) uint8 -> (n, 28, 28, 1) float32 in [0, 1]
    (xtr, ytr), (xv, yv), (xte, yte) = [(normalise(xs), ys) for xs, ys in splits]
    return Dataset(xtr, ytr, xv, yv, xte, yte, source=f"{source}: {folder}")


def split_sizes(subset: int | None = None) -> tuple[int, int, int]:
    """(train, validation, test) image counts for ``subset`` (None: the full 48,000 / 12,000 / 10,000)."""
    if subset is None:
        return N_TRAIN, N_VAL, N_TEST
    return min(subset, N_TRAIN), min(max(subset // 4, 10), N_VAL), min(subset, N_TEST)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) or (n, 784) -> float32 (n, 28, 28, 1) in [0, 1]."""
    return (np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 28, 28, 1)


def dataset_inputs(seed: int, subset: int | None, eval_split: str, fit_split: str = "train") -> list[dict]:
    """What a trial reads, as MLflow dataset inputs: the images it trains on (context ``training``)
    and those it clusters and scores (context ``evaluation``). The digest follows from the four files'
    checksums (checked on every load) and the split (seed, subset), so two runs that show the same
    digest read the same images; the profile gives the counts."""
    files = "".join(sha for _, _, sha in FILES.values())
    train, val, test = split_sizes(subset)
    scored = {"test": test, "train": train + val, "all": train + val + test}[eval_split]
    split = f"seed {seed}, {'all images' if subset is None else f'subset {subset}'}"

    def record(name: str, context: str, part: str, profile: dict) -> dict:
        digest = hashlib.sha256(f"{files}|{part}|seed={seed}|subset={subset}".encode()).hexdigest()[:16]
        return {"name": name, "digest": digest, "context": context, "split": split, "profile": profile}

    trained = (record("fashion-mnist-train", "training", "train", {"train": train, "validation": val})
               if fit_split == "train" else
               record("fashion-mnist-all", "training", "all", {"train": train + val + test, "validation": 0}))
    return [trained,
            record(f"fashion-mnist-{eval_split}", "evaluation", eval_split, {"images": scored})]
