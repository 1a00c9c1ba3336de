"""Datasets a recipe can name: scikit-learn's digits, generated Gaussian classes, generated
token sequences, the user's own arrays in an ``.npz`` file, MNIST-1D, or Fashion-MNIST's
IDX files from a folder (the Debian package ``dataset-fashion-mnist``). Nothing is
downloaded.

Features are standardized unless the recipe says ``standardize: false``; integer features
in an ``.npz`` (token ids) are kept as they are unless it says ``standardize: true``.
Fashion-MNIST's pixels are scaled to [0, 1] instead unless it says ``standardize: true``.

``tokens`` (see :func:`_repeated_tokens`) are int64 token ids, always kept as they are:
each sequence's label is the one token that occurs ``repeats`` times in it, so a model
has to compare the tokens across the whole sequence (what attention does) to find it."""

from __future__ import annotations

import functools
import gzip
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .schema import Fields

DATA_KEYS = {
    "digits": ("name", "test_fraction", "seed", "standardize"),
    "synthetic": ("name", "classes", "dim", "samples", "noise", "test_fraction", "seed", "standardize"),
    "tokens": ("name", "classes", "vocab", "length", "repeats", "samples", "test_fraction", "seed", "standardize"),
    "npz": ("name", "path", "classes", "test_fraction", "seed", "standardize"),
    "mnist1d": ("name", "samples", "seed", "standardize"),
    "fashion-mnist": ("name", "path", "standardize"),
}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
IDX_IMAGES, IDX_LABELS = 2051, 2049  # IDX magic: unsigned bytes, 3 dimensions / 1 dimension
IMBALANCE_RATIO = 5


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays with int64 labels in ``[0, classes)``.

    Features are float32, or int64 when the data's features are integers (token ids) and
    not standardized, so an embedding can index with them. ``notes`` are things done to
    the data that its owner should hear about, such as remapped labels.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    name: str
    notes: tuple[str, ...] = ()

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    @property
    def imbalanced(self) -> bool:
        """The largest class is at least 5x the smallest (train and test together, classes
        that occur): plain accuracy then flatters a model that favours the large classes."""
        counts = torch.bincount(torch.cat([self.y_train, self.y_test]).cpu())
        counts = counts[counts > 0]
        return bool(counts.numel() > 0 and counts.max() >= IMBALANCE_RATIO * counts.min())


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the classes present in ``labels``: each class counts the same,
    however many examples it has. ``predictions`` are class indices, one per label."""
    labels = labels.reshape(-1)
    predictions = predictions.reshape(-1).to(labels.device)
    if labels.numel() == 0 or predictions.shape != labels.shape:
        raise ValueError(f"need one prediction per label and at least one label, got {predictions.numel()} "
                         f"predictions for {labels.numel()} labels")
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    hits = torch.zeros(len(classes), dtype=torch.float64, device=labels.device)
    hits.index_add_(0, inverse, (predictions == labels).to(torch.float64))
    return float((hits / counts).mean())


def validate_data_spec(data: Fields, base_dir: Path) -> dict[str, Any]:
    name = data.string("name", choices=DATA_KEYS)
    data = Fields(data.source, data.path, data.value, DATA_KEYS[name])
    spec: dict[str, Any] = {
        "name": name,
        "test_fraction": data.number("test_fraction", 0.2, low=0.0, high=1.0, low_open=True, high_open=True),
        "seed": data.integer("seed", 0, low=0),
        "standardize": data.boolean("standardize") if data.value.get("standardize") is not None else None,
    }
    if name == "synthetic":
        spec.update(classes=data.integer("classes", low=2, high=100_000), dim=data.integer("dim", low=1),
                    samples=data.integer("samples", low=2), noise=data.number("noise", 1.0, low=0.0))
        if spec["samples"] < 2 * spec["classes"]:
            data.fail(f"needs at least 2 samples per class ({2 * spec['classes']})", field=data.sub("samples"))
    elif name == "tokens":
        _validate_tokens(data, spec)
    elif name == "mnist1d":
        spec.update(samples=data.integer("samples", 5000, low=100))
    elif name == "npz":
        path = Path(data.string("path"))
        spec["path"] = str(path if path.is_absolute() else base_dir / path)
        spec["classes"] = data.integer("classes", low=2) if data.has("classes") else None
    elif name == "fashion-mnist":
        path = Path(data.string("path", FASHION_MNIST_DIR))
        spec["path"] = str(path if path.is_absolute() else base_dir / path)
    return spec


def _validate_tokens(data: Fields, spec: dict[str, Any]) -> None:
    """The ``tokens`` fields into ``spec``, each refused on its own with its name."""
    if spec["standardize"]:
        data.fail("token ids are categories, not measurements: tokens cannot be standardized "
                  "(leave standardize out, or false)", field=data.sub("standardize"))
    classes = data.integer("classes", 1000, low=2, high=100_000)
    vocab = data.integer("vocab", classes, low=2)
    if vocab < classes:
        data.fail(f"must be >= classes ({classes}): every label is a token", field=data.sub("vocab"))
    length = data.integer("length", 32, low=3)
    repeats = data.integer("repeats", 4, low=2)
    if repeats >= length:
        data.fail(f"must be < length ({length}): other tokens need room", field=data.sub("repeats"))
    needed = 1 + math.ceil((length - repeats) / (repeats - 1))
    if vocab < needed:
        data.fail(f"is too small for length {length} and repeats {repeats}: the {length - repeats} other "
                  f"positions, each token fewer than {repeats} times, need vocab >= {needed}",
                  field=data.sub("vocab"))
    samples = data.integer("samples", 30_000, low=2)
    if samples < 2 * classes:
        data.fail(f"needs at least 2 samples per class ({2 * classes})", field=data.sub("samples"))
    spec.update(classes=classes, vocab=vocab, length=length, repeats=repeats, samples=samples)


def load_data(spec: dict[str, Any], source: str) -> Dataset:
    name = spec["name"]
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
        x_train, y_train, x_test, y_test = _split(x, y, spec["test_fraction"], spec["seed"], source)
        return _dataset(x_train, y_train, x_test, y_test, 10, "digits", _standardize(spec))
    if name == "synthetic":
        x, y = _gaussian_classes(spec)
        x_train, y_train, x_test, y_test = _split(x, y, spec["test_fraction"], spec["seed"], source)
        return _dataset(x_train, y_train, x_test, y_test, spec["classes"], f"synthetic-{spec['classes']}",
                        _standardize(spec))
    if name == "tokens":
        x, y = _repeated_tokens(spec)
        x_train, y_train, x_test, y_test = _split(x, y, spec["test_fraction"], spec["seed"], source)
        return _dataset(x_train, y_train, x_test, y_test, spec["classes"], f"tokens-{spec['classes']}",
                        _standardize(spec, integer=True))
    if name == "mnist1d":
        return _mnist1d(spec, source)
    if name == "fashion-mnist":
        return _fashion_mnist(spec, source)
    return _load_npz(spec, source)


def _mnist1d(spec: dict[str, Any], source: str) -> Dataset:
    """MNIST-1D (Greydanus 2020) generated by its package, offline: 40-sample 1-d signals of
    10 digit templates, its own 80/20 split. The package reseeds NumPy's and Python's global
    generators, so their states are restored afterwards."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise InputError(source, "data.name", "mnist1d needs its package: pip install 'lpcli[mnist1d]'") from None
    import random

    args = get_dataset_args()
    args.num_samples, args.seed = spec["samples"], spec["seed"]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return _dataset(data["x"], data["y"], data["x_test"], data["y_test"], 10, "mnist1d", _standardize(spec))


def _fashion_mnist(spec: dict[str, Any], source: str) -> Dataset:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 28x28 grey images of ten kinds of clothing,
    flattened to 784 features like digits' 64 (a convolution reshapes them to 1x28x28); the
    official split, 60,000 to train on and the 10,000 ``t10k`` images to test on.

    Pixels are scaled to [0, 1] rather than standardized per pixel: the border pixels are
    almost always 0, and dividing by their tiny spread (down to 0.0004) turns a rare faint
    pixel into a value near 185, which would set the input format's range for nothing. In
    [0, 1] the inputs need no integer bits at all. ``standardize: true`` still asks for the
    per-pixel standardization every other dataset gets."""
    try:
        x_train, y_train, x_test, y_test = _read_fashion_mnist(str(Path(spec["path"]).resolve()))
    except _IdxError as exc:
        raise InputError(source, "data.path", str(exc)) from None
    standardize = bool(spec.get("standardize"))
    if standardize:
        return _dataset(x_train.reshape(len(x_train), -1), y_train, x_test.reshape(len(x_test), -1), y_test,
                        10, "fashion-mnist", True)
    scaled = [np.divide(x.reshape(len(x), -1), np.float32(255), dtype=np.float32) for x in (x_train, x_test)]
    return _dataset(scaled[0], y_train, scaled[1], y_test, 10, "fashion-mnist", False)


class _IdxError(ValueError):
    """A problem with the IDX files, said without the recipe; the caller names it."""


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four IDX files of ``directory`` as read-only uint8 arrays (train images, train
    labels, test images, test labels), decoded once per process: analyze and train-check
    both load the data, and decompressing 60,000 images takes a good part of a second."""
    folder = Path(directory)
    if not folder.is_dir():
        raise _IdxError(f"Fashion-MNIST not found: no folder {directory}; install it with "
                        f"{FASHION_MNIST_INSTALL} (or point data.path at a folder with its four IDX files)")
    arrays = []
    for split in ("train", "t10k"):
        images = _read_idx(folder, f"{split}-images-idx3-ubyte", IDX_IMAGES)
        labels = _read_idx(folder, f"{split}-labels-idx1-ubyte", IDX_LABELS)
        if len(images) != len(labels):
            raise _IdxError(f"{split}-images has {len(images)} images but {split}-labels has {len(labels)} labels")
        if len(labels) and labels.max() > 9:
            raise _IdxError(f"{split}-labels has label {int(labels.max())}; Fashion-MNIST's are 0..9")
        arrays += [images, labels]
    return tuple(arrays)  # type: ignore[return-value]


def _read_idx(folder: Path, stem: str, magic: int) -> np.ndarray:
    """One IDX file, gzipped (``stem.gz``) or not: the header's magic and sizes are checked
    against what Fashion-MNIST holds and against the file's length."""
    candidates = [folder / f"{stem}.gz", folder / stem]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise _IdxError(f"{folder} has no {stem}.gz (nor {stem}); install Fashion-MNIST with "
                        f"{FASHION_MNIST_INSTALL}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; EOFError: cut short
        raise _IdxError(f"cannot read {path}: {exc}") from None
    dims = 3 if magic == IDX_IMAGES else 1
    header = 4 + 4 * dims
    if len(raw) < header:
        raise _IdxError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    found, *shape = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, header, 4))
    if found != magic:
        raise _IdxError(f"{path} is not an IDX {'image' if dims == 3 else 'label'} file: magic number {found}, "
                        f"expected {magic}")
    if dims == 3 and shape[1:] != [28, 28]:
        raise _IdxError(f"{path} holds {shape[1]}x{shape[2]} images; Fashion-MNIST's are 28x28")
    expected = header + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise _IdxError(f"{path} is {what}: the header declares {shape[0]} {'images' if dims == 3 else 'labels'} "
                        f"({expected} bytes), the file has {len(raw)} bytes")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    array.flags.writeable = False
    return array


def _gaussian_classes(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Class means drawn from N(0, I); samples N(mean, noise^2 I); equal class sizes."""
    rng = np.random.default_rng(spec["seed"])
    classes, dim = spec["classes"], spec["dim"]
    means = rng.standard_normal((classes, dim))
    y = np.arange(spec["samples"]) % classes
    x = means[y] + spec["noise"] * rng.standard_normal((spec["samples"], dim))
    return x, y.astype(np.int64)


def _repeated_tokens(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` int64 sequences of ``length`` token ids in ``[0, vocab)`` and their labels.

    The labels take each of the ``classes`` values equally often (as ``synthetic``'s do), in
    random order. A sequence labelled ``c`` holds the token ``c`` at ``repeats`` distinct random
    positions; every other position holds a token drawn uniformly from ``[0, vocab)`` without
    ``c``, redrawn while it has already been drawn ``repeats - 1`` times in that sequence. So
    ``c`` is the only token occurring ``repeats`` times: the label is well defined, and no
    single position or token value gives it away; a model has to compare tokens across
    positions. For a vocabulary much larger than the length (the default: 1000 and 32) the
    redraw almost never happens and the other tokens are plain uniform draws.
    """
    rng = np.random.default_rng(spec["seed"])
    samples, vocab, length, repeats = spec["samples"], spec["vocab"], spec["length"], spec["repeats"]
    y = rng.permutation(np.arange(samples) % spec["classes"]).astype(np.int64)
    others = np.empty((samples, length - repeats), dtype=np.int64)
    for j in range(length - repeats):
        redraw = np.arange(samples)
        while len(redraw):
            drawn = rng.integers(0, vocab - 1, size=len(redraw))
            drawn += drawn >= y[redraw]  # uniform over [0, vocab) without the label
            others[redraw, j] = drawn
            full = (others[redraw, :j] == drawn[:, None]).sum(axis=1) >= repeats - 1
            redraw = redraw[full]
    label_at = np.argsort(rng.random((samples, length)), axis=1) < repeats  # repeats random positions
    x = np.empty((samples, length), dtype=np.int64)
    x[label_at] = np.repeat(y, repeats)
    x[~label_at] = others.reshape(-1)
    return x, y


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, source: str):
    """Stratified where every class can appear in both splits; a plain shuffle otherwise."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    present = int((counts > 0).sum())
    test = math.ceil(test_fraction * len(y))
    if test >= len(y):
        raise InputError(source, "data.test_fraction", f"{test_fraction:g} of {len(y)} samples leaves none "
                         f"to train on")
    stratifiable = counts[counts > 0].min() >= 2 and min(test, len(y) - test) >= present
    stratify = y if stratifiable else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=stratify)
    return x_train, y_train, x_test, y_test


def _standardize(spec: dict[str, Any], integer: bool = False) -> bool:
    """Measurements are standardized by default; integer features are ids, whose values mean
    nothing on a scale, so they are kept unless the recipe asks."""
    choice = spec.get("standardize")
    return not integer if choice is None else choice


def _is_integer(x: np.ndarray) -> bool:
    return bool(np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_)


def _dataset(x_train, y_train, x_test, y_test, classes: int, name: str, standardize: bool,
             notes: tuple[str, ...] = ()) -> Dataset:
    """Standardize with the training split's mean and std (constant features stay 0), so the
    test split sees the same transform; features kept raw stay int64 if they are integers."""
    if standardize:
        x_train, x_test = np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64)
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    dtype = np.int64 if _is_integer(np.asarray(x_train)) and _is_integer(np.asarray(x_test)) else np.float32
    return Dataset(
        torch.from_numpy(np.ascontiguousarray(x_train, dtype=dtype)),
        torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(x_test, dtype=dtype)),
        torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        classes,
        name,
        notes,
    )


def _listed(values: np.ndarray, head: int = 5) -> str:
    shown = [str(int(v)) for v in values]
    if len(shown) > head + 1:
        shown = shown[:head] + ["...", shown[-1]]
    return f"[{', '.join(shown)}]"


def _load_npz(spec: dict[str, Any], source: str) -> Dataset:
    path = spec["path"]
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise InputError(source, "data.path", f"file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise InputError(source, "data.path", f"cannot read {path} as .npz: {exc}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise InputError(path, key, f"missing array {key!r} (has: {', '.join(arrays) or 'none'})")
    has_test = "x_test" in arrays or "y_test" in arrays
    if has_test and not ("x_test" in arrays and "y_test" in arrays):
        raise InputError(path, "x_test" if "x_test" not in arrays else "y_test", "x_test and y_test come together")
    pairs = [("x", "y")] + ([("x_test", "y_test")] if has_test else [])
    for xk, yk in pairs:
        x, y = arrays[xk], arrays[yk]
        if x.ndim < 2 or len(x) == 0:
            raise InputError(path, xk, f"must be a non-empty array of shape (samples, features...), got {x.shape}")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise InputError(path, xk, f"must be numeric, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.complexfloating):
            raise InputError(path, xk, f"must be real, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise InputError(path, xk, "contains NaN or inf")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise InputError(path, yk, f"must be a 1-d integer array of labels, got shape {y.shape} dtype {y.dtype}")
        if len(y) != len(x):
            raise InputError(path, yk, f"has {len(y)} labels for {len(x)} samples in {xk}")
        if (y < 0).any():
            raise InputError(path, yk, "labels must be >= 0")
    if has_test and arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
        raise InputError(path, "x_test", f"sample shape {arrays['x_test'].shape[1:]} differs from x's "
                         f"{arrays['x'].shape[1:]}")
    integer = all(_is_integer(arrays[xk]) for xk, _ in pairs)
    standardize = _standardize(spec, integer)
    if not standardize:
        for xk, _ in pairs:
            x = arrays[xk]
            if integer and x.dtype == np.uint64 and x.max() > np.iinfo(np.int64).max:
                raise InputError(path, xk, f"has integer {int(x.max())}, beyond int64")
            if not integer and np.abs(x).max() > np.finfo(np.float32).max:
                raise InputError(path, xk, "has values beyond float32's range; standardize them "
                                 "(data.standardize: true)")
    features = np.int64 if integer and not standardize else np.float64
    x, y = arrays["x"].astype(features), arrays["y"].astype(np.int64)
    y_test = arrays["y_test"].astype(np.int64) if has_test else np.zeros(0, dtype=np.int64)
    notes: tuple[str, ...] = ()
    if spec.get("classes") is not None:
        for yk in ("y", "y_test") if has_test else ("y",):
            if arrays[yk].max() >= spec["classes"]:
                raise InputError(path, yk, f"has label {int(arrays[yk].max())}, outside the {spec['classes']} "
                                 f"classes the recipe declares (data.classes)")
        classes = spec["classes"]
    else:
        labels = np.unique(np.concatenate([y, y_test]))
        if len(labels) < 2:
            raise InputError(path, "y", f"needs at least 2 classes, got the single label {int(labels[0])} in "
                             f"{'y and y_test' if has_test else 'y'}")
        classes = len(labels)
        if labels[-1] != classes - 1:
            y, y_test = np.searchsorted(labels, y), np.searchsorted(labels, y_test)
            notes = (f"labels remapped: {classes} distinct values {_listed(labels)} -> 0..{classes - 1}",)
    if has_test:
        x_train, y_train, x_test = x, y, arrays["x_test"].astype(features)
    else:
        if len(y) < 4:
            raise InputError(path, "x", f"needs at least 4 samples to split off a test set, got {len(y)}")
        x_train, y_train, x_test, y_test = _split(x, y, spec["test_fraction"], spec["seed"], source)
    return _dataset(x_train, y_train, x_test, y_test, classes, Path(path).stem, standardize, notes)


def batch_indices(samples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The index batches of a run: a fresh permutation each epoch, full batches only.

    Every run of a train-check draws the same list, so fp32, plain and Kahan see the
    same examples in the same order.
    """
    batch_size = min(batch_size, samples)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = samples // batch_size
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(samples, generator=generator)
        batches.extend(order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
    return batches[:steps]
