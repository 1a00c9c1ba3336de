"""Datasets a recipe can name: scikit-learn's digits, generated Gaussian classes, or
the user's own arrays in an ``.npz`` file. Nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .schema import Fields

DATA_KEYS = {
    "digits": ("name", "test_fraction", "seed"),
    "synthetic": ("name", "classes", "dim", "samples", "noise", "test_fraction", "seed"),
    "npz": ("name", "path", "classes", "test_fraction", "seed"),
}


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays as float32 features and int64 labels in ``[0, classes)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    name: str

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                       self.y_test.to(device), self.classes, self.name)


def validate_data_spec(data: Fields, base_dir: Path) -> dict[str, Any]:
    name = data.string("name", choices=DATA_KEYS)
    data = Fields(data.source, data.path, data.value, DATA_KEYS[name])
    spec: dict[str, Any] = {
        "name": name,
        "test_fraction": data.number("test_fraction", 0.2, low=0.0, high=1.0, low_open=True, high_open=True),
        "seed": data.integer("seed", 0, low=0),
    }
    if name == "synthetic":
        spec.update(classes=data.integer("classes", low=2, high=100_000), dim=data.integer("dim", low=1),
                    samples=data.integer("samples", low=2), noise=data.number("noise", 1.0, low=0.0))
        if spec["samples"] < 2 * spec["classes"]:
            data.fail(f"needs at least 2 samples per class ({2 * spec['classes']})", field=data.sub("samples"))
    elif name == "npz":
        path = Path(data.string("path"))
        spec["path"] = str(path if path.is_absolute() else base_dir / path)
        spec["classes"] = data.integer("classes", low=2) if data.has("classes") else None
    return spec


def load_data(spec: dict[str, Any], source: str) -> Dataset:
    name = spec["name"]
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
        x_train, y_train, x_test, y_test = _split(x, y, spec["test_fraction"], spec["seed"])
        return _standardized(x_train, y_train, x_test, y_test, 10, "digits")
    if name == "synthetic":
        x, y = _gaussian_classes(spec)
        x_train, y_train, x_test, y_test = _split(x, y, spec["test_fraction"], spec["seed"])
        return _standardized(x_train, y_train, x_test, y_test, spec["classes"], f"synthetic-{spec['classes']}")
    return _load_npz(spec, source)


def _gaussian_classes(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Class means drawn from N(0, I); samples N(mean, noise^2 I); equal class sizes."""
    rng = np.random.default_rng(spec["seed"])
    classes, dim = spec["classes"], spec["dim"]
    means = rng.standard_normal((classes, dim))
    y = np.arange(spec["samples"]) % classes
    x = means[y] + spec["noise"] * rng.standard_normal((spec["samples"], dim))
    return x, y.astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=stratify)
    return x_train, y_train, x_test, y_test


def _standardized(x_train, y_train, x_test, y_test, classes: int, name: str) -> Dataset:
    """Scale features with the training split's mean and std (constant features stay 0)."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return Dataset(
        torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        torch.from_numpy(((x_test - mean) / std).astype(np.float32)),
        torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        classes,
        name,
    )


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
        if not np.issubdtype(x.dtype, np.number):
            raise InputError(path, xk, f"must be numeric, got dtype {x.dtype}")
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
    x = arrays["x"].astype(np.float64)
    y = arrays["y"].astype(np.int64)
    classes = int(max(y.max(), arrays["y_test"].max() if has_test else 0)) + 1
    if spec.get("classes") is not None:
        for yk in ("y", "y_test") if has_test else ("y",):
            if arrays[yk].max() >= spec["classes"]:
                raise InputError(path, yk, f"has label {int(arrays[yk].max())}, outside the {spec['classes']} "
                                 f"classes the recipe declares (data.classes)")
        classes = spec["classes"]
    if classes < 2:
        raise InputError(path, "y", "needs at least 2 classes")
    if has_test:
        x_train, y_train, x_test, y_test = x, y, arrays["x_test"].astype(np.float64), arrays["y_test"].astype(np.int64)
    else:
        if len(y) < 4:
            raise InputError(path, "x", f"needs at least 4 samples to split off a test set, got {len(y)}")
        x_train, y_train, x_test, y_test = _split(x, y, spec["test_fraction"], spec["seed"])
    return _standardized(x_train, y_train, x_test, y_test, classes, Path(path).stem)


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
