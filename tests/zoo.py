"""A zoo of small user models and their data, the acceptance set for models loaded
through a recipe's ``model: {import: "zoo:<factory>"}`` entry.

Each entry pairs a factory (any ``nn.Module``, built from keyword arguments) with a data
generator that writes an ``.npz`` file (``x``, ``y``, ``x_test``, ``y_test``, seeded
NumPy) and training settings short enough that analyze, recommend and train-check of one
entry take a few seconds on one CPU thread. Every task is learnable: fp32 ends well above
chance within the entry's steps.

The models cover what a layer list cannot express: integer token inputs (an embedding,
a learnable parameter on the root module, multi-head attention), recurrent layers whose
parameters are not called ``weight``, 1-d convolutions, a tied weight and a module called
twice, a 0-dim learnable scalar on the root module, batch norm with a residual add, and a
model whose output is not a tensor (which every command must refuse as bad input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------- models


class TokenTransformer(nn.Module):
    """Token ids ``(batch, seq_len)`` -> embedding + a learnable positional table on the root
    module -> one ``TransformerEncoderLayer`` -> mean over positions -> linear head."""

    def __init__(self, vocab: int = 16, seq_len: int = 8, d: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, d))
        self.encoder = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        return self.head(self.encoder(h).mean(dim=1))


class RecurrentClassifier(nn.Module):
    """``(batch, time, features)`` -> one LSTM or GRU layer -> linear head on the last step."""

    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU], features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Conv1dClassifier(nn.Module):
    """``(batch, channels, length)`` -> Conv1d -> ReLU -> max pool -> flatten -> linear."""

    def __init__(self, channels: int = 2, length: int = 16, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, width, kernel_size=3, padding=1)
        self.pool = nn.MaxPool1d(4)
        self.head = nn.Linear(width * (length // 4), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class TiedShared(nn.Module):
    """An MLP with ``b.weight`` tied to ``a.weight`` (one Parameter, two modules) and a block
    ``shared`` called twice per forward (residually)."""

    def __init__(self, features: int = 8, d: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(features, d)
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.shared = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + torch.relu(self.a(h))
        h = h + torch.relu(self.b(h))
        h = h + self.shared(h)
        h = h + self.shared(h)
        return self.head(h)


class Temperature(nn.Module):
    """An MLP whose logits are multiplied by a learnable 0-dim ``scale`` on the root module."""

    def __init__(self, features: int = 8, d: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(features, d)
        self.head = nn.Linear(d, classes)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x))) * self.scale


class BNResidualCNN(nn.Module):
    """``(batch, 1, 8, 8)`` -> conv-bn-relu -> (conv-bn + identity) -> relu -> avg pool 2x2 -> linear."""

    def __init__(self, width: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.head(torch.flatten(self.pool(h), 1))


class DictOutput(nn.Module):
    """A linear model whose forward returns ``{"logits": ...}`` instead of a tensor."""

    def __init__(self, features: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(x)}


# Factories: what a recipe's ``import: "zoo:<name>"`` calls with its ``kwargs``.


def token_transformer(vocab: int = 16, seq_len: int = 8, d: int = 16, classes: int = 4) -> nn.Module:
    return TokenTransformer(vocab, seq_len, d, classes)


def lstm_classifier(features: int = 4, hidden: int = 16, classes: int = 4) -> nn.Module:
    return RecurrentClassifier(nn.LSTM, features, hidden, classes)


def gru_classifier(features: int = 4, hidden: int = 16, classes: int = 4) -> nn.Module:
    return RecurrentClassifier(nn.GRU, features, hidden, classes)


def conv1d_classifier(channels: int = 2, length: int = 16, width: int = 8, classes: int = 4) -> nn.Module:
    return Conv1dClassifier(channels, length, width, classes)


def tied_shared(features: int = 8, d: int = 16, classes: int = 4) -> nn.Module:
    return TiedShared(features, d, classes)


def temperature(features: int = 8, d: int = 16, classes: int = 4) -> nn.Module:
    return Temperature(features, d, classes)


def bn_residual_cnn(width: int = 4, classes: int = 10) -> nn.Module:
    return BNResidualCNN(width, classes)


def dict_output(features: int = 8, classes: int = 4) -> nn.Module:
    return DictOutput(features, classes)


# ----------------------------------------------------------------------------- data
# Each generator writes x, y, x_test, y_test to ``path`` and returns the class count.

TRAIN, TEST = 512, 256


def _save(path: Path, x: np.ndarray, y: np.ndarray, train: int = TRAIN) -> None:
    np.savez(path, x=x[:train], y=y[:train].astype(np.int64), x_test=x[train:], y_test=y[train:].astype(np.int64))


def tokens(path: Path, seed: int = 0, vocab: int = 16, seq_len: int = 8, classes: int = 4) -> int:
    """int64 token ids: filler tokens from ``[classes, vocab)`` with the class's own token
    (id = label) at three random positions."""
    rng = np.random.default_rng(seed)
    n = TRAIN + TEST
    y = rng.integers(0, classes, n)
    x = rng.integers(classes, vocab, (n, seq_len))
    for i in range(n):
        x[i, rng.choice(seq_len, 3, replace=False)] = y[i]
    _save(path, x.astype(np.int64), y)
    return classes


def sequences(path: Path, seed: int = 0, time: int = 8, features: int = 4, classes: int = 4) -> int:
    """float32 ``(samples, time, features)``: a per-class mean sequence plus unit noise."""
    rng = np.random.default_rng(seed)
    n = TRAIN + TEST
    means = 1.5 * rng.standard_normal((classes, time, features))
    y = rng.integers(0, classes, n)
    x = means[y] + rng.standard_normal((n, time, features))
    _save(path, x.astype(np.float32), y)
    return classes


def signals(path: Path, seed: int = 0, channels: int = 2, length: int = 16, classes: int = 4) -> int:
    """float32 ``(samples, channels, length)``: sinusoids whose frequency per channel is set by
    the class, at a random phase, plus noise."""
    rng = np.random.default_rng(seed)
    n = TRAIN + TEST
    y = rng.integers(0, classes, n)
    t = np.arange(length) / length
    freq = 1 + np.stack([y, (y * 3) % classes], axis=1)  # (n, channels=2)
    freq = np.concatenate([freq] * (channels // 2 + 1), axis=1)[:, :channels]
    phase = rng.uniform(0, 2 * np.pi, (n, channels, 1))
    x = np.sin(2 * np.pi * freq[:, :, None] * t + phase) + 0.3 * rng.standard_normal((n, channels, length))
    _save(path, x.astype(np.float32), y)
    return classes


def vectors(path: Path, seed: int = 0, features: int = 8, classes: int = 4) -> int:
    """float32 ``(samples, features)``: Gaussian classes around N(0, I) means, unit noise."""
    rng = np.random.default_rng(seed)
    n = TRAIN + TEST
    means = 1.5 * rng.standard_normal((classes, features))
    y = rng.integers(0, classes, n)
    x = means[y] + rng.standard_normal((n, features))
    _save(path, x.astype(np.float32), y)
    return classes


def digit_images(path: Path, seed: int = 0) -> int:
    """float32 ``(samples, 1, 8, 8)``: scikit-learn's digits scaled to [0, 1], shuffled,
    600 for training and 300 for testing."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:900]
    x = (digits.images[order] / 16.0).reshape(-1, 1, 8, 8)
    _save(path, x.astype(np.float32), digits.target[order], train=600)
    return 10


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """A zoo model: its factory (a name in this module), kwargs, data and training settings."""

    factory: str
    data: Callable[..., int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    min_fp32_accuracy: float = 0.6

    def build(self) -> nn.Module:
        return globals()[self.factory](**self.kwargs)


def _training(**overrides: Any) -> dict[str, Any]:
    base = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 16, "steps": 60,
            "analyze_steps": 10, "seed": 0}
    return {**base, **overrides}


ZOO: dict[str, Entry] = {
    "token_transformer": Entry("token_transformer", tokens, training=_training()),
    "lstm": Entry("lstm_classifier", sequences, training=_training()),
    "gru": Entry("gru_classifier", sequences, training=_training()),
    "conv1d": Entry("conv1d_classifier", signals, training=_training()),
    "tied_shared": Entry("tied_shared", vectors, training=_training()),
    "temperature": Entry("temperature", vectors, training=_training()),
    "bn_residual_cnn": Entry("bn_residual_cnn", digit_images, training=_training()),
}
BAD: dict[str, Entry] = {
    "dict_output": Entry("dict_output", vectors, training=_training()),
}


def write_recipe(directory: Path, name: str, entry: Entry, seed: int = 0) -> Path:
    """Write ``<name>.npz`` and ``<name>.yaml`` (a recipe importing ``zoo:<factory>``) into
    ``directory``; returns the recipe's path."""
    import yaml

    data_path = directory / f"{name}.npz"
    entry.data(data_path, seed)
    recipe = {
        "description": f"zoo: {entry.factory}",
        "model": {"import": f"zoo:{entry.factory}", "kwargs": dict(entry.kwargs)},
        "data": {"name": "npz", "path": data_path.name},
        "training": dict(entry.training),
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}
