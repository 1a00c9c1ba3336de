"""Fashion-MNIST from its IDX files: the reader against tiny IDX files written here (good
files, gzipped or not, and every kind of damage: exit 2 through the real CLI with one
line), the real files of Debian's dataset-fashion-mnist when installed, and the bundled
fashion recipes."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lpcli.data import FASHION_MNIST_DIR, FASHION_MNIST_INSTALL, load_data, validate_data_spec
from lpcli.models import build_model
from lpcli.recipe import bundled_recipes, load_recipe
from lpcli.schema import Fields

from conftest import run_cli

INSTALLED = Path(FASHION_MNIST_DIR).is_dir()
needs_fashion_mnist = pytest.mark.skipif(
    not INSTALLED, reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
FASHION_RECIPES = ("fashion-mlp", "fashion-cnn", "fashion-resnet")
STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file as the format's spec lays it out: a big-endian magic (0x0803 for 3-d
    unsigned bytes, 0x0801 for 1-d), one big-endian uint32 per dimension, then the bytes."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def arrays(train: int = 30, test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"train_images": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
            "train_labels": (np.arange(train) % 10).astype(np.uint8),
            "test_images": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
            "test_labels": (np.arange(test) % 10)[::-1].astype(np.uint8)}


def write_idx_folder(folder: Path, content: dict[str, bytes | np.ndarray | None] | None = None,
                     gz: bool = True) -> Path:
    """The four files in ``folder``; ``content`` replaces a file's arrays or raw bytes (None:
    leave that file out)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes | np.ndarray | None] = {**arrays(), **(content or {})}
    for key, value in files.items():
        if value is None:
            continue
        raw = idx(value) if isinstance(value, np.ndarray) else value
        if gz:
            (folder / f"{STEMS[key]}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / STEMS[key]).write_bytes(raw)
    return folder


def fashion_spec(path: Path | str | None, base: Path = Path("."), **fields) -> dict:
    data = {"name": "fashion-mnist", **({} if path is None else {"path": str(path)}), **fields}
    return validate_data_spec(Fields("recipe.yaml", "data", data), base)


def write_recipe(tmp_path: Path, data: dict) -> Path:
    doc = {"model": {"layers": [{"type": "linear", "in": 784, "out": 10}]}, "data": data,
           "training": {"lr": 0.05, "batch_size": 8, "steps": 4, "analyze_steps": 2}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "uncompressed"])
def test_reads_idx_files_as_pixels_in_unit_range(tmp_path, gz):
    folder = write_idx_folder(tmp_path / "fm", gz=gz)
    data = load_data(fashion_spec(folder), "recipe.yaml")
    raw = arrays()
    assert data.name == "fashion-mnist" and data.classes == 10
    assert tuple(data.x_train.shape) == (30, 784) and tuple(data.x_test.shape) == (20, 784)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    # The oracle: torch's own float32 division of the bytes, row-major flattening.
    expected = torch.from_numpy(raw["train_images"].reshape(30, 784).astype(np.float32)) / 255
    assert torch.equal(data.x_train, expected)
    assert torch.equal(data.x_test, torch.from_numpy(raw["test_images"].reshape(20, 784).astype(np.float32)) / 255)
    assert data.y_train.tolist() == raw["train_labels"].tolist()
    assert data.y_test.tolist() == raw["test_labels"].tolist()
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0


def test_standardize_true_standardizes_each_pixel_with_the_training_split(tmp_path):
    folder = write_idx_folder(tmp_path / "fm")
    data = load_data(fashion_spec(folder, standardize=True), "recipe.yaml")
    raw = arrays()
    x_train = raw["train_images"].reshape(30, 784).astype(np.float64)
    x_test = raw["test_images"].reshape(20, 784).astype(np.float64)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std == 0, 1.0, std)
    np.testing.assert_allclose(data.x_train.numpy(), (x_train - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data.x_test.numpy(), (x_test - mean) / std, rtol=1e-6, atol=1e-6)


def test_path_defaults_to_the_debian_folder_and_relative_paths_follow_the_recipe(tmp_path):
    assert fashion_spec(None)["path"] == str(Path(FASHION_MNIST_DIR))
    write_idx_folder(tmp_path / "recipes" / "fm")
    recipe_path = write_recipe(tmp_path / "recipes", {"name": "fashion-mnist", "path": "fm"})
    recipe = load_recipe(recipe_path)
    assert recipe.data["path"] == str(tmp_path / "recipes" / "fm")
    assert len(load_data(recipe.data, recipe.source).y_train) == 30


def test_decoded_once_per_folder(tmp_path):
    from lpcli.data import _read_fashion_mnist

    folder = write_idx_folder(tmp_path / "fm")
    first = load_data(fashion_spec(folder), "recipe.yaml")
    hits = _read_fashion_mnist.cache_info().hits
    second = load_data(fashion_spec(folder), "recipe.yaml")
    assert _read_fashion_mnist.cache_info().hits == hits + 1
    assert torch.equal(first.x_train, second.x_train)
    first.x_train.add_(1.0)  # a caller's tensors are its own: the cache keeps the bytes
    assert torch.equal(load_data(fashion_spec(folder), "recipe.yaml").x_train, second.x_train)


def _images(n: int = 30, rows: int = 28, cols: int = 28) -> np.ndarray:
    return np.zeros((n, rows, cols), dtype=np.uint8)


# (files replaced or left out, the message fragment)
BAD_FOLDERS = [
    ({"train_images": idx(_images(), magic=2049)}, "not an IDX image file: magic number 2049, expected 2051"),
    ({"test_labels": idx(np.zeros(20, np.uint8), magic=2051)}, "not an IDX label file: magic number 2051, "
                                                               "expected 2049"),
    ({"train_images": idx(_images())[:-100]}, "truncated: the header declares 30 images (23536 bytes), the file "
                                              "has 23436 bytes"),
    ({"train_labels": idx(np.zeros(30, np.uint8))[:5]}, "truncated: 5 bytes, shorter than its 8-byte header"),
    ({"test_images": idx(_images(20)) + b"\0"}, "longer than its header says"),
    ({"train_labels": np.zeros(29, np.uint8)}, "train-images has 30 images but train-labels has 29 labels"),
    ({"test_images": _images(20, 27, 28)}, "holds 27x28 images; Fashion-MNIST's are 28x28"),
    ({"test_labels": np.full(20, 10, np.uint8)}, "t10k-labels has label 10; Fashion-MNIST's are 0..9"),
    ({"test_labels": None}, f"has no t10k-labels-idx1-ubyte.gz (nor t10k-labels-idx1-ubyte); install "
                            f"Fashion-MNIST with {FASHION_MNIST_INSTALL}"),
]


def assert_one_line(result, recipe: Path, message: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {recipe}: data.path: "), lines[0]
    assert message in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize(("content", "message"), BAD_FOLDERS)
def test_damaged_idx_files_are_one_line_of_bad_input(tmp_path, content, message):
    folder = write_idx_folder(tmp_path / "fm", content)
    recipe = write_recipe(tmp_path, {"name": "fashion-mnist", "path": str(folder)})
    assert_one_line(run_cli("analyze", recipe), recipe, message)


def test_a_file_that_is_not_gzip_is_one_line_of_bad_input(tmp_path):
    folder = write_idx_folder(tmp_path / "fm")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    recipe = write_recipe(tmp_path, {"name": "fashion-mnist", "path": str(folder)})
    assert_one_line(run_cli("analyze", recipe), recipe, f"cannot read {folder / 'train-labels-idx1-ubyte.gz'}")


def test_a_cut_gzip_stream_is_one_line_of_bad_input(tmp_path):
    folder = write_idx_folder(tmp_path / "fm")
    whole = (folder / "t10k-images-idx3-ubyte.gz").read_bytes()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(whole[:len(whole) // 2])
    recipe = write_recipe(tmp_path, {"name": "fashion-mnist", "path": str(folder)})
    assert_one_line(run_cli("analyze", recipe), recipe, f"cannot read {folder / 't10k-images-idx3-ubyte.gz'}")


@pytest.mark.parametrize("command", ["analyze", "train-check"])
def test_missing_folder_gives_the_install_command(tmp_path, command):
    recipe = write_recipe(tmp_path, {"name": "fashion-mnist", "path": "no-such-folder"})
    line = assert_one_line(run_cli(command, recipe), recipe, f"install it with {FASHION_MNIST_INSTALL}")
    assert str(tmp_path / "no-such-folder") in line


def test_fields_of_other_datasets_are_refused(tmp_path):
    recipe = write_recipe(tmp_path, {"name": "fashion-mnist", "test_fraction": 0.1})
    result = run_cli("analyze", recipe)
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {recipe}: data.test_fraction: unknown key; allowed: name, path, "
                                     f"standardize")


def test_fashion_recipes_are_bundled_and_build_for_28x28_images():
    assert set(FASHION_RECIPES) <= set(bundled_recipes())
    x = torch.rand(3, 784)
    for name in FASHION_RECIPES:
        recipe = load_recipe(name)
        assert recipe.data == {**recipe.data, "name": "fashion-mnist", "path": str(Path(FASHION_MNIST_DIR))}
        model = build_model(recipe.model, recipe.source, recipe.base_dir)
        assert tuple(model(x).shape) == (3, 10), name
    resnet = load_recipe("fashion-resnet")
    assert (resnet.training.momentum, resnet.training.schedule) == (0.9, "cosine")


def test_resnet_digits_keeps_its_8x8_network():
    """The generalized factory (size, stem_pool, pool) builds the same modules for digits."""
    recipe = load_recipe("resnet-digits")
    model = build_model(recipe.model, recipe.source, recipe.base_dir)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    convs = {f"blocks.{b}.conv{c}.weight": (8, 8, 3, 3) for b in range(2) for c in (1, 2)}
    norms = {f"blocks.{b}.bn{c}.{p}": (8,) for b in range(2) for c in (1, 2) for p in ("weight", "bias")}
    assert shapes == {"stem.conv.weight": (8, 1, 3, 3), "stem.bn.weight": (8,), "stem.bn.bias": (8,), **convs,
                      **norms, "head.weight": (10, 32), "head.bias": (10,)}
    assert tuple(model(torch.rand(2, 64)).shape) == (2, 10)


@needs_fashion_mnist
def test_installed_files_are_the_official_split():
    data = load_data(fashion_spec(None), "recipe.yaml")
    assert tuple(data.x_train.shape) == (60_000, 784) and tuple(data.x_test.shape) == (10_000, 784)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    assert not data.imbalanced


@needs_fashion_mnist
def test_analyze_runs_on_the_installed_files():
    result = run_cli("analyze", "fashion-mlp", "--steps", "3", "--json")
    assert result.exit_code == 0, result.stderr
    stats = result.json()
    assert stats["source"]["data"] == "fashion-mnist" and stats["classes"] == 10
    assert set(stats["layers"]) == {"0", "2"}


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("name", FASHION_RECIPES)
def test_fashion_recipes_train_and_pass(name):
    """Train-checks of about 15 s (mlp), 4.5 min (cnn, 3 seeds) and 2.2 min (resnet) on one thread;
    each recipe's fp32 run reaches its accuracy and the Kahan run passes the verdict."""
    result = run_cli("train-check", name, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    floor = 0.84 if name == "fashion-mlp" else 0.85
    assert report["runs"]["fp32"]["test_accuracy"] >= floor
    assert report["verdict"]["passed"]
