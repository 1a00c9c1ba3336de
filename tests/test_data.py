"""Datasets: MNIST-1D through its package (offline), and the message without it; integer
features, the standardize switch, label remapping, imbalance and balanced accuracy; the
generated ``tokens`` sequences (the label is the token that repeats) and their fields."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score

from lpcli.data import Dataset, balanced_accuracy, load_data, validate_data_spec
from lpcli.errors import InputError
from lpcli.models import build_model
from lpcli.recipe import load_recipe
from lpcli.schema import Fields
from lpcli.stats import check_model_output

from conftest import RECIPES, run_cli


def test_mnist1d_generated_offline_leaves_global_generators_alone():
    pytest.importorskip("mnist1d")
    recipe = load_recipe(RECIPES / "mnist1d-mlp.yaml")
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.get_state()[1][:4].tolist(), random.getstate())
    data = load_data({**recipe.data, "samples": 1000}, recipe.source)
    assert (np.random.get_state()[1][:4].tolist(), random.getstate()) == expected
    assert tuple(data.x_train.shape) == (800, 40) and tuple(data.x_test.shape) == (200, 40)
    assert data.classes == 10 and set(data.y_train.tolist()) == set(range(10))
    again = load_data({**recipe.data, "samples": 1000}, recipe.source)
    assert bool((again.x_train == data.x_train).all())


def test_mnist1d_without_its_package_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    doc = yaml.safe_load((RECIPES / "mnist1d-mlp.yaml").read_text())
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run_cli("analyze", path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path}: data.name: mnist1d needs its package: pip install 'lpcli[mnist1d]'"


def npz_data(tmp_path, arrays: dict, **spec) -> Dataset:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return load_data({"name": "npz", "path": str(path), "test_fraction": 0.2, "seed": 0, "classes": None,
                      "standardize": None, **spec}, "recipe.yaml")


def standardized(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the training split's mean and std, in float64, constant features left 0."""
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std == 0, 1.0, std)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def tokens(rng: np.random.Generator, samples: int) -> dict[str, np.ndarray]:
    return {"x": rng.integers(0, 1000, size=(samples, 12)), "y": np.arange(samples) % 3,
            "x_test": rng.integers(0, 1000, size=(samples // 4, 12)), "y_test": np.arange(samples // 4) % 3}


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32, np.int64, np.uint64])
def test_integer_npz_features_stay_int64_and_raw(tmp_path, dtype):
    arrays = tokens(np.random.default_rng(1), 40)
    arrays["x"], arrays["x_test"] = arrays["x"].astype(dtype) % 100, arrays["x_test"].astype(dtype) % 100
    data = npz_data(tmp_path, arrays)
    assert data.x_train.dtype == torch.int64 and data.x_test.dtype == torch.int64
    assert np.array_equal(data.x_train.numpy(), arrays["x"].astype(np.int64))
    assert np.array_equal(data.x_test.numpy(), arrays["x_test"].astype(np.int64))


def test_integer_npz_split_keeps_rows_intact(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50, size=(40, 6))
    data = npz_data(tmp_path, {"x": x, "y": np.arange(40) % 4})
    assert data.x_train.dtype == torch.int64 and len(data.x_train) + len(data.x_test) == 40
    split = np.concatenate([data.x_train.numpy(), data.x_test.numpy()])
    assert sorted(map(tuple, split.tolist())) == sorted(map(tuple, x.tolist()))


def test_boolean_npz_features_count_as_integers(tmp_path):
    rng = np.random.default_rng(3)
    x, x_test = rng.random((20, 5)) > 0.5, rng.random((8, 5)) > 0.5
    data = npz_data(tmp_path, {"x": x, "y": np.arange(20) % 2, "x_test": x_test, "y_test": np.arange(8) % 2})
    assert data.x_train.dtype == torch.int64
    assert np.array_equal(data.x_train.numpy(), x.astype(np.int64))
    assert np.array_equal(data.x_test.numpy(), x_test.astype(np.int64))


def test_standardize_true_on_integer_features(tmp_path):
    arrays = tokens(np.random.default_rng(4), 40)
    data = npz_data(tmp_path, arrays, standardize=True)
    want_train, want_test = standardized(arrays["x"], arrays["x_test"])
    assert data.x_train.dtype == torch.float32 and data.x_test.dtype == torch.float32
    np.testing.assert_allclose(data.x_train.numpy(), want_train, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data.x_test.numpy(), want_test, rtol=1e-6, atol=1e-6)


def test_float_features_standardized_by_default_and_raw_on_request(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {"x": rng.normal(3.0, 7.0, size=(30, 4)), "y": np.arange(30) % 3,
              "x_test": rng.normal(3.0, 7.0, size=(9, 4)), "y_test": np.arange(9) % 3}
    arrays["x"][:, 2] = 1.5
    default = npz_data(tmp_path, arrays)
    want_train, want_test = standardized(arrays["x"], arrays["x_test"])
    np.testing.assert_allclose(default.x_train.numpy(), want_train, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(default.x_test.numpy(), want_test, rtol=1e-6, atol=1e-6)
    assert bool((default.x_train[:, 2] == 0).all())
    raw = npz_data(tmp_path, arrays, standardize=False)
    assert raw.x_train.dtype == torch.float32
    assert np.array_equal(raw.x_train.numpy(), arrays["x"].astype(np.float32))
    assert np.array_equal(raw.x_test.numpy(), arrays["x_test"].astype(np.float32))


def test_mixed_integer_and_float_features_are_treated_as_float(tmp_path):
    arrays = tokens(np.random.default_rng(6), 40)
    arrays["x_test"] = arrays["x_test"].astype(np.float64)
    data = npz_data(tmp_path, arrays)
    want_train, want_test = standardized(arrays["x"], arrays["x_test"])
    assert data.x_train.dtype == torch.float32 and data.x_test.dtype == torch.float32
    np.testing.assert_allclose(data.x_test.numpy(), want_test, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", [{"name": "digits"},
                                  {"name": "synthetic", "classes": 4, "dim": 6, "samples": 80, "noise": 1.0}],
                         ids=lambda s: s["name"])
def test_standardize_false_keeps_raw_float32(spec):
    spec = {"test_fraction": 0.2, "seed": 0, **spec}
    default = load_data(spec, "recipe.yaml")
    raw = load_data({**spec, "standardize": False}, "recipe.yaml")
    assert raw.x_train.dtype == torch.float32 and raw.x_test.dtype == torch.float32
    assert bool((raw.y_train == default.y_train).all())
    want_train, want_test = standardized(raw.x_train.numpy(), raw.x_test.numpy())
    np.testing.assert_allclose(default.x_train.numpy(), want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(default.x_test.numpy(), want_test, rtol=1e-5, atol=1e-5)
    assert not np.allclose(raw.x_train.numpy(), default.x_train.numpy())
    assert load_data({**spec, "standardize": True}, "recipe.yaml").x_train.equal(default.x_train)


def test_standardize_false_on_digits_gives_pixel_values():
    raw = load_data({"name": "digits", "test_fraction": 0.2, "seed": 0, "standardize": False}, "recipe.yaml")
    values = torch.cat([raw.x_train, raw.x_test])
    assert float(values.min()) == 0.0 and float(values.max()) == 16.0
    assert bool((values == values.round()).all())


def test_mnist1d_standardize_false_keeps_raw_float32():
    pytest.importorskip("mnist1d")
    spec = {"name": "mnist1d", "samples": 200, "seed": 0, "test_fraction": 0.2}
    default = load_data(spec, "recipe.yaml")
    raw = load_data({**spec, "standardize": False}, "recipe.yaml")
    assert raw.x_train.dtype == torch.float32
    want_train, _ = standardized(raw.x_train.numpy(), raw.x_test.numpy())
    np.testing.assert_allclose(default.x_train.numpy(), want_train, rtol=1e-4, atol=1e-4)


def test_labels_remapped_with_a_note(tmp_path):
    rng = np.random.default_rng(7)
    y, y_test = np.array([0, 3, 7] * 6), np.array([9, 0, 3, 9])
    arrays = {"x": rng.normal(size=(18, 3)), "y": y, "x_test": rng.normal(size=(4, 3)), "y_test": y_test}
    data = npz_data(tmp_path, arrays)
    assert data.classes == 4
    assert data.y_train.tolist() == [0, 1, 2] * 6 and data.y_test.tolist() == [3, 0, 1, 3]
    assert data.notes == ("labels remapped: 4 distinct values [0, 3, 7, 9] -> 0..3",)
    assert data.to("cpu").notes == data.notes


def test_long_label_lists_are_abbreviated_in_the_note(tmp_path):
    labels = np.arange(10, 30)
    data = npz_data(tmp_path, {"x": np.random.default_rng(8).normal(size=(60, 3)), "y": np.tile(labels, 3)})
    assert data.classes == 20
    assert sorted(set(torch.cat([data.y_train, data.y_test]).tolist())) == list(range(20))
    assert data.notes == ("labels remapped: 20 distinct values [10, 11, 12, 13, 14, ..., 29] -> 0..19",)


def test_remap_follows_the_labels_through_the_split(tmp_path):
    rng = np.random.default_rng(9)
    y = np.repeat([5, 50, 500], 10)
    x = np.column_stack([y, rng.integers(0, 9, size=30)])
    data = npz_data(tmp_path, {"x": x, "y": y})
    lookup = {5: 0, 50: 1, 500: 2}
    for xs, ys in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert [lookup[v] for v in xs[:, 0].tolist()] == ys.tolist()


def test_declared_classes_keep_the_labels(tmp_path):
    rng = np.random.default_rng(10)
    y, y_test = np.array([0, 3, 7] * 6), np.array([9, 0, 3, 9])
    arrays = {"x": rng.normal(size=(18, 3)), "y": y, "x_test": rng.normal(size=(4, 3)), "y_test": y_test}
    data = npz_data(tmp_path, arrays, classes=10)
    assert data.classes == 10 and data.notes == ()
    assert data.y_train.tolist() == y.tolist() and data.y_test.tolist() == y_test.tolist()


def test_labels_already_dense_get_no_note(tmp_path):
    rng = np.random.default_rng(11)
    arrays = {"x": rng.normal(size=(20, 3)), "y": np.arange(20) % 4,
              "x_test": rng.normal(size=(5, 3)), "y_test": np.array([0, 1, 2, 3, 4])}
    data = npz_data(tmp_path, arrays)
    assert data.classes == 5 and data.notes == ()
    assert data.y_train.tolist() == arrays["y"].tolist() and data.y_test.tolist() == [0, 1, 2, 3, 4]


def test_standardize_is_optional_and_null_means_the_default(tmp_path):
    for value, want in ((None, None), (True, True), (False, False)):
        spec = validate_data_spec(Fields("r.yaml", "data", {"name": "digits", "standardize": value}), tmp_path)
        assert spec["standardize"] is want
    assert validate_data_spec(Fields("r.yaml", "data", {"name": "digits"}), tmp_path)["standardize"] is None


def test_test_split_smaller_than_the_classes_falls_back_to_a_shuffle():
    spec = {"name": "synthetic", "classes": 10, "dim": 3, "samples": 40, "noise": 1.0, "test_fraction": 0.1,
            "seed": 0}
    data = load_data(spec, "recipe.yaml")
    assert len(data.y_test) == 4 and len(data.y_train) == 36


def test_built_in_datasets_have_no_notes():
    assert load_data({"name": "digits", "test_fraction": 0.2, "seed": 0}, "recipe.yaml").notes == ()


def labelled(counts: dict[int, int], classes: int) -> Dataset:
    y = torch.tensor([label for label, count in counts.items() for _ in range(count)])
    test = len(y) // 3
    return Dataset(torch.zeros(len(y) - test, 2), y[test:], torch.zeros(test, 2), y[:test], classes, "counts")


def test_imbalanced_at_five_to_one_over_both_splits():
    assert labelled({0: 50, 1: 10}, 2).imbalanced
    assert not labelled({0: 40, 1: 10}, 2).imbalanced
    assert not labelled({0: 49, 1: 10, 2: 30}, 3).imbalanced
    assert labelled({0: 10, 2: 50}, 5).imbalanced, "classes that never occur do not count"
    assert not labelled({1: 12, 3: 12}, 4).imbalanced
    split = Dataset(torch.zeros(50, 1), torch.zeros(50, dtype=torch.int64), torch.zeros(10, 1),
                    torch.ones(10, dtype=torch.int64), 2, "split")
    assert split.imbalanced, "train holds one class, test the other"


@pytest.mark.parametrize("seed", range(8))
def test_balanced_accuracy_matches_sklearn(seed):
    generator = torch.Generator().manual_seed(seed)
    classes = 2 + seed
    labels = torch.randint(0, classes, (200,), generator=generator)
    labels[labels == 0] = 1
    labels[:3] = 0
    predictions = torch.where(torch.rand(200, generator=generator) < 0.6, labels,
                              torch.randint(0, classes, (200,), generator=generator))
    predictions[predictions == classes - 1] = 0
    assert not bool((predictions == classes - 1).any()), "one class is never predicted"
    want = balanced_accuracy_score(labels.numpy(), predictions.numpy())
    assert balanced_accuracy(predictions, labels) == pytest.approx(want, abs=1e-12)


def test_balanced_accuracy_ignores_predicted_classes_absent_from_labels():
    labels = torch.tensor([0, 0, 0, 2, 2])
    predictions = torch.tensor([0, 1, 0, 2, 1])
    with pytest.warns(UserWarning):
        want = balanced_accuracy_score(labels.numpy(), predictions.numpy())
    assert balanced_accuracy(predictions, labels) == pytest.approx(want) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert balanced_accuracy(labels, labels) == 1.0


def test_balanced_accuracy_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one prediction per label"):
        balanced_accuracy(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="at least one label"):
        balanced_accuracy(torch.zeros(0), torch.zeros(0))


def tokens_spec(tmp_path, **fields) -> dict:
    """A ``tokens`` spec as a recipe's data section gives it, through the validation."""
    return validate_data_spec(Fields("r.yaml", "data", {"name": "tokens", **fields}), tmp_path)


SMALL_TOKENS = {"classes": 20, "vocab": 50, "length": 12, "repeats": 3, "samples": 400}


def test_tokens_defaults(tmp_path):
    spec = tokens_spec(tmp_path)
    assert {k: spec[k] for k in ("classes", "vocab", "length", "repeats", "samples", "test_fraction", "seed")} == {
        "classes": 1000, "vocab": 1000, "length": 32, "repeats": 4, "samples": 30000, "test_fraction": 0.2, "seed": 0}
    assert tokens_spec(tmp_path, classes=50, samples=100)["vocab"] == 50, "vocab defaults to classes"


def test_tokens_are_raw_int64_ids_with_balanced_labels(tmp_path):
    data = load_data(tokens_spec(tmp_path, **SMALL_TOKENS), "r.yaml")
    assert tuple(data.x_train.shape) == (320, 12) and tuple(data.x_test.shape) == (80, 12)
    assert data.x_train.dtype == torch.int64 and data.x_test.dtype == torch.int64
    assert data.y_train.dtype == torch.int64 and data.classes == 20 and data.name == "tokens-20"
    x = torch.cat([data.x_train, data.x_test])
    assert int(x.min()) >= 0 and int(x.max()) < 50
    assert torch.bincount(torch.cat([data.y_train, data.y_test]), minlength=20).tolist() == [20] * 20
    assert not data.imbalanced and data.notes == ()
    same = load_data(tokens_spec(tmp_path, **SMALL_TOKENS, standardize=False), "r.yaml")
    assert torch.equal(same.x_train, data.x_train), "standardize: false is the default"


def test_tokens_are_determined_by_the_seed(tmp_path):
    first = load_data(tokens_spec(tmp_path, **SMALL_TOKENS, seed=3), "r.yaml")
    again = load_data(tokens_spec(tmp_path, **SMALL_TOKENS, seed=3), "r.yaml")
    other = load_data(tokens_spec(tmp_path, **SMALL_TOKENS, seed=4), "r.yaml")
    for a, b in ((first.x_train, again.x_train), (first.y_train, again.y_train), (first.x_test, again.x_test),
                 (first.y_test, again.y_test)):
        assert torch.equal(a, b)
    assert not torch.equal(first.x_train, other.x_train)


@pytest.mark.parametrize("fields", [SMALL_TOKENS, {"classes": 10, "vocab": 11, "length": 32, "repeats": 4,
                                                    "samples": 300},
                                    {"classes": 5, "vocab": 9, "length": 9, "repeats": 2, "samples": 200}],
                         ids=["small", "tightest-vocab-4", "tightest-vocab-2"])
def test_the_label_is_the_only_token_that_repeats(tmp_path, fields):
    """Counted apart from the generator: the label occurs exactly ``repeats`` times, every
    other token fewer, also where the vocabulary is as small as the fields allow."""
    data = load_data(tokens_spec(tmp_path, **fields, seed=1), "r.yaml")
    x = torch.cat([data.x_train, data.x_test]).numpy()
    y = torch.cat([data.y_train, data.y_test]).numpy()
    counts = np.stack([np.bincount(row, minlength=fields["vocab"]) for row in x])
    rows = np.arange(len(y))
    assert (counts[rows, y] == fields["repeats"]).all()
    counts[rows, y] = 0
    assert (counts.max(axis=1) < fields["repeats"]).all()
    positions = [tuple(np.flatnonzero(row == label)) for row, label in zip(x, y, strict=True)]
    assert len(set(positions)) > 1, "the label's positions vary"


# (fields, the field named, a message fragment)
BAD_TOKENS = [
    ({"standardize": True}, "data.standardize", "cannot be standardized"),
    ({"classes": 1}, "data.classes", ">= 2"),
    ({"classes": 2.5}, "data.classes", "must be an integer"),
    ({"classes": 10, "vocab": 9}, "data.vocab", ">= classes (10)"),
    ({"length": 2}, "data.length", ">= 3"),
    ({"repeats": 1}, "data.repeats", ">= 2"),
    ({"length": 8, "repeats": 8}, "data.repeats", "< length (8)"),
    ({"classes": 10, "vocab": 10, "length": 32, "repeats": 4}, "data.vocab", "vocab >= 11"),
    ({"classes": 50, "samples": 99}, "data.samples", "at least 2 samples per class (100)"),
    ({"test_fraction": 1.0}, "data.test_fraction", "< 1"),
    ({"seed": -1}, "data.seed", ">= 0"),
    ({"noise": 1.0}, "data.noise", "unknown key"),
]


@pytest.mark.parametrize("fields, field, message", BAD_TOKENS,
                         ids=[f"{i}-{case[1]}" for i, case in enumerate(BAD_TOKENS)])
def test_bad_tokens_fields_are_bad_input_naming_the_field(tmp_path, fields, field, message):
    with pytest.raises(InputError) as caught:
        tokens_spec(tmp_path, **fields)
    assert caught.value.source == "r.yaml" and caught.value.field == field
    assert message in caught.value.message


def test_the_bundled_token_recipe_takes_its_data(tmp_path):
    """tokens-1000's model maps int64 token ids to one logit per class (on fewer samples)."""
    recipe = load_recipe(RECIPES / "tokens-1000.yaml")
    assert recipe.data["name"] == "tokens" and recipe.data["classes"] == 1000
    data = load_data({**recipe.data, "samples": 2000}, recipe.source)
    torch.manual_seed(0)
    check_model_output(build_model(recipe.model, recipe.source, recipe.base_dir), data, recipe.source,
                       recipe.model_label)
