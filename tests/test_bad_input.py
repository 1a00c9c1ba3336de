"""Malformed input of every kind: exit 2, one line on stderr naming the file and the
field, no traceback, and no output file written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RECIPES, run_cli

BASE = yaml.safe_load((RECIPES / "digits-mlp.yaml").read_text())
BASE["training"].update(steps=20, analyze_steps=3)
class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def mutated(doc: dict, path: str, value) -> dict:
    """A deep copy of ``doc`` with the dotted ``path`` set to ``value`` (or deleted)."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[int(key) if isinstance(target, list) else key]
    key = int(last) if isinstance(target, list) else last
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return doc


def assert_bad_input(result, source: Path | str, field: str, message: str = "", output: Path | None = None):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    assert str(source) in line, line
    assert field in line, line
    assert message in line, line
    assert result.stdout == ""
    if output is not None:
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}.*")), "temporary file left behind"


# (dotted path, value, field named in the error, message fragment)
RECIPE_CASES = [
    ("model", DELETE, "model", "missing"),
    ("data", DELETE, "data", "missing"),
    ("training", DELETE, "training", "missing"),
    ("model", "mlp", "model", "must be a mapping"),
    ("model", [1, 2], "model", "must be a mapping"),
    ("model.layers", [], "model.layers", "non-empty list"),
    ("model.layers", "linear", "model.layers", "non-empty list"),
    ("model.layerz", [], "model.layerz", "did you mean 'layers'"),
    ("model.layers.0", "linear", "model.layers[0]", "must be a mapping"),
    ("model.layers.0.type", "lstm", "model.layers[0].type", "must be one of"),
    ("model.layers.0.type", "Linear", "model.layers[0].type", "did you mean 'linear'"),
    ("model.layers.0.type", DELETE, "model.layers[0].type", "missing"),
    ("model.layers.0.in", DELETE, "model.layers[0].in", "missing"),
    ("model.layers.0.in", 0, "model.layers[0].in", ">= 1"),
    ("model.layers.0.in", -3, "model.layers[0].in", ">= 1"),
    ("model.layers.0.in", 6.5, "model.layers[0].in", "must be an integer"),
    ("model.layers.0.in", "64", "model.layers[0].in", "must be an integer"),
    ("model.layers.0.in", True, "model.layers[0].in", "must be an integer"),
    ("model.layers.0.out", None, "model.layers[0].out", "missing"),
    ("model.layers.0.bias", "yes", "model.layers[0].bias", "true or false"),
    ("model.layers.0.outt", 3, "model.layers[0].outt", "did you mean 'out'"),
    ("model.layers.0.kernel", 3, "model.layers[0].kernel", "unknown key"),
    ("model.layers.1.inplace", True, "model.layers[1].inplace", "unknown key"),
    ("model.layers.2.out", 7, "model", "10 classes"),
    ("model.layers.0.in", 65, "model", "does not accept"),
    ("model.layers.1", {"type": "dropout", "p": 1.0}, "model.layers[1].p", "< 1"),
    ("model.layers.1", {"type": "dropout", "p": -0.1}, "model.layers[1].p", ">= 0"),
    ("model.layers.1", {"type": "reshape", "shape": [0, 8]}, "model.layers[1].shape", "positive integers"),
    ("model.layers.1", {"type": "reshape", "shape": "8x8"}, "model.layers[1].shape", "positive integers"),
    ("model.layers.1", {"type": "conv2d", "in": 1, "out": 4}, "model.layers[1].kernel", "missing"),
    ("model.layers.1", {"type": "maxpool2d", "kernel": 0}, "model.layers[1].kernel", ">= 1"),
    ("model.layers.1", {"type": "batchnorm"}, "model.layers[1].features", "missing"),
    ("model", {"import": "nosuchpkg.models:make"}, "model.import", "cannot import"),
    ("model", {"import": "json:no_such_factory"}, "model.import", "has no attribute"),
    ("model", {"import": "json"}, "model.import", "package.module:factory"),
    ("model", {"import": "json:dumps", "kwargs": {"x": 1}}, "model.kwargs", "rejected the arguments"),
    ("model", {"import": "json:loads", "kwargs": {"s": "1"}}, "model.import", "not an nn.Module"),
    ("model", {"import": "json:loads", "kwargs": "s"}, "model.kwargs", "must be a mapping"),
    ("model", {"import": "a:b", "layers": []}, "model.layers", "unknown key"),
    ("data.name", "mnist", "data.name", "must be one of"),
    ("data.name", "digit", "data.name", "did you mean 'digits'"),
    ("data.name", DELETE, "data.name", "missing"),
    ("data.name", 3, "data.name", "non-empty string"),
    ("data.test_fraction", 0, "data.test_fraction", "> 0"),
    ("data.test_fraction", 1.5, "data.test_fraction", "< 1"),
    ("data.seed", -1, "data.seed", ">= 0"),
    ("data.classes", 10, "data.classes", "unknown key"),
    ("data", {"name": "synthetic", "classes": 1, "dim": 4, "samples": 100}, "data.classes", ">= 2"),
    ("data", {"name": "synthetic", "classes": 10, "samples": 100}, "data.dim", "missing"),
    ("data", {"name": "synthetic", "classes": 10, "dim": 4, "samples": 10}, "data.samples", "2 samples per class"),
    ("data", {"name": "synthetic", "classes": 10, "dim": 4, "samples": 100, "noise": -1}, "data.noise", ">= 0"),
    ("data", {"name": "npz"}, "data.path", "missing"),
    ("data", {"name": "npz", "path": "nowhere.npz"}, "data.path", "file not found"),
    ("data.test_fraction", 0.9999, "data.test_fraction", "none to train on"),
    ("data.standardize", "yes", "data.standardize", "true or false"),
    ("data.standardize", "false", "data.standardize", "true or false"),
    ("data.standardize", 1, "data.standardize", "true or false"),
    ("data.standardize", 0, "data.standardize", "true or false"),
    ("data.standardize", [True], "data.standardize", "true or false"),
    ("data.standardise", False, "data.standardise", "did you mean 'standardize'"),
    ("data", {"name": "synthetic", "classes": 10, "dim": 64, "samples": 100, "standardize": "no"},
     "data.standardize", "true or false"),
    ("data", {"name": "npz", "path": "nowhere.npz", "standardize": 1.0}, "data.standardize", "true or false"),
    ("data", {"name": "mnist1d", "standardize": "off"}, "data.standardize", "true or false"),
    ("training.lr", -1, "training.lr", "> 0"),
    ("training.lr", 0, "training.lr", "> 0"),
    ("training.lr", "fast", "training.lr", "must be a number"),
    ("training.lr", float("nan"), "training.lr", "finite"),
    ("training.lr", float("inf"), "training.lr", "finite"),
    ("training.lr", DELETE, "training.lr", "missing"),
    ("training.momentum", 1.0, "training.momentum", "< 1"),
    ("training.momentum", -0.5, "training.momentum", ">= 0"),
    ("training.weight_decay", -0.1, "training.weight_decay", ">= 0"),
    ("training.batch_size", 0, "training.batch_size", ">= 1"),
    ("training.batch_size", 8.0, "training.batch_size", "must be an integer"),
    ("training.steps", 0, "training.steps", ">= 1"),
    ("training.steps", DELETE, "training.steps", "missing"),
    ("training.seed", "zero", "training.seed", "must be an integer"),
    ("training.analyze_steps", 0, "training.analyze_steps", ">= 1"),
    ("training.epochs", 3, "training.epochs", "unknown key"),
    ("training.learning_rate", 0.1, "training.learning_rate", "unknown key"),
    ("training.optimizer", "adagrad", "training.optimizer", "must be one of"),
    ("training.optimizer", "adamww", "training.optimizer", "did you mean 'adamw'"),
    ("training.optimizer", "adamw", "training.momentum", "applies to sgd; adamw uses betas"),
    ("training.betas", [0.9, 0.999], "training.betas", "apply to adam and adamw"),
    ("training.eps", 1e-8, "training.eps", "apply to adam and adamw"),
    ("training.schedule", "linear", "training.schedule", "must be one of"),
    ("training.schedule", "step", "training.step_every", "missing"),
    ("training.min_lr", 0.01, "training.min_lr", "applies to schedule: cosine"),
    ("training.gamma", 0.5, "training.gamma", "apply to schedule: step"),
    ("training.warmup_steps", 20, "training.warmup_steps", "<= 19"),
    ("training.warmup_steps", -1, "training.warmup_steps", ">= 0"),
    ("trainin", {}, "trainin", "did you mean 'training'"),
    ("precission", {}, "precission", "did you mean 'precision'"),
    ("description", 5, "description", "must be a string"),
    ("precision", "fx8.7", "precision", "must be a mapping"),
    ("precision.weights", "fx8.7", "precision.weights", "did you mean 'weight'"),
    ("precision.weight", "fx99.3", "precision.weight", "fixed-point width"),
    ("precision.weight", "fx1.0", "precision.weight", "fixed-point width"),
    ("precision.weight", 8, "precision.weight", "must be a string"),
    ("precision.activation", "int8", "precision.activation", "fx<W>.<F>"),
    ("precision.error", "e9m2", "precision.error", "exponent bits"),
    ("precision.error", "e4m30", "precision.error", "mantissa bits"),
    ("precision.weight_grad", "dfx1", "precision.weight_grad", "width"),
    ("precision.softmax_input", "fx8.", "precision.softmax_input", "unknown format"),
    ("precision.softmax_error", "", "precision.softmax_error", "unknown format"),
    ("precision.activation", "mxfp8-e4m3", "precision.activation", "apply to the operands of a layer"),
    ("precision.kahan", "yes", "precision.kahan", "true or false"),
    ("precision.layers", ["0"], "precision.layers", "must be a mapping"),
    ("precision.layers", {"0": {"weigth": "fx8.7"}}, "precision.layers.0.weigth", "did you mean 'weight'"),
    ("precision.layers", {"0": {"weight": "fx8"}}, "precision.layers.0.weight", "unknown format"),
    ("precision.layers", {"0": "fx8.7"}, "precision.layers.0", "must be a mapping"),
    ("precision.layers", {"7": {"weight": "fx8.7"}}, "precision.layers.7", "no layer '7'"),
]


@pytest.mark.parametrize("path,value,field,message", RECIPE_CASES,
                         ids=[f"{c[0]}={c[1]!r}"[:60] for c in RECIPE_CASES])
def test_bad_recipe(tmp_path, path, value, field, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(mutated(BASE, path, value)))
    out = tmp_path / "plan.yaml"
    assert_bad_input(run_cli("recommend", recipe, "-o", out), recipe, field, message, out)


RAW_RECIPES = [
    ("", "", "is empty"),
    ("# only a comment\n", "", "is empty"),
    ("- a\n- b\n", "", "must be a mapping"),
    ("model: [unclosed\n", "line", "invalid YAML"),
    ("model:\n  layers:\n\t- {type: relu}\n", "line", "invalid YAML"),
    ("model: {layers: [{type: relu}]\ndata: {name: digits", "line", "invalid YAML"),
    ("just text", "", "must be a mapping"),
    ("!!python/object/apply:os.system ['echo hacked']\n", "line", "invalid YAML"),
    ("model: *undefined\n", "line", "invalid YAML"),
]


@pytest.mark.parametrize("text,field,message", RAW_RECIPES)
def test_malformed_recipe_text(tmp_path, text, field, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "report.json"
    assert_bad_input(run_cli("train-check", recipe, "-o", out), recipe, field, message, out)


def test_unreadable_recipes(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert_bad_input(run_cli("analyze", binary), binary, "", "cannot read")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert_bad_input(run_cli("analyze", folder), folder, "", "directory")
    json_recipe = tmp_path / "recipe.json"
    json_recipe.write_text('{"model": ')
    assert_bad_input(run_cli("analyze", json_recipe), json_recipe, "line 1", "invalid JSON")


@pytest.fixture(scope="module")
def valid_stats(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.yaml"
    recipe = path.parent / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    assert run_cli("analyze", recipe, "--steps", "3", "-o", path).exit_code == 0
    return yaml.safe_load(path.read_text())


STATS_CASES = [
    ("lpcli", DELETE, "lpcli", "missing header"),
    ("lpcli.version", 2, "lpcli.version", "newer than this lpcli"),
    ("lpcli.version", 0, "lpcli.version", "positive integer"),
    ("lpcli.version", "1", "lpcli.version", "positive integer"),
    ("lpcli.kind", "plan", "lpcli.kind", "expected 'stats'"),
    ("classes", 1, "classes", ">= 2"),
    ("classes", "ten", "classes", "must be an integer"),
    ("classes", DELETE, "classes", "missing"),
    ("output_layer", 2, "output_layer", "layer name"),
    ("training", DELETE, "training", "missing"),
    ("training.lr", -0.1, "training.lr", "> 0"),
    ("training.lr", float("nan"), "training.lr", "finite"),
    ("training.schedule", "cosine", "training.schedule", "unknown key"),
    ("training.late_lr_factor", 2, "training.late_lr_factor", "<= 1"),
    ("layers", {}, "layers", "has no layers"),
    ("layers", [1], "layers", "must be a mapping"),
    ("layers.0.weight", DELETE, "layers.0.weight", "missing"),
    ("layers.0.update", DELETE, "layers.0.update", "missing"),
    ("layers.0.weight.absmax", float("nan"), "layers.0.weight.absmax", "finite"),
    ("layers.0.weight.absmax", float("inf"), "layers.0.weight.absmax", "finite"),
    ("layers.0.weight.absmax", -1.0, "layers.0.weight.absmax", ">= 0"),
    ("layers.0.activation.rms", -0.5, "layers.0.activation.rms", ">= 0"),
    ("layers.0.error.rms", "small", "layers.0.error.rms", "must be a number"),
    ("layers.0.error.p99", -1e-3, "layers.0.error.p99", ">= 0"),
    ("layers.0.weight_grad.zero_share", 1.5, "layers.0.weight_grad.zero_share", "<= 1"),
    ("layers.0.weight.std", 0.1, "layers.0.weight.std", "unknown key"),
    ("layers.0.weight.log2_hist", {"lowest": -10, "counts": [1, -2]}, "layers.0.weight.log2_hist.counts",
     "non-negative integers"),
    ("layers.0.weight.log2_hist", {"lowest": "low", "counts": [1]}, "layers.0.weight.log2_hist.lowest",
     "must be an integer"),
    ("layers.0.parameters", -5, "layers.0.parameters", ">= 0"),
    ("layers.0.gradient", {}, "layers.0.gradient", "unknown key"),
]


@pytest.mark.parametrize("path,value,field,message", STATS_CASES,
                         ids=[f"{c[0]}={c[1]!r}"[:60] for c in STATS_CASES])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_bad_stats(tmp_path, valid_stats, suffix, path, value, field, message):
    stats = tmp_path / f"stats{suffix}"
    doc = mutated(valid_stats, path, value)
    stats.write_text(json.dumps(doc) if suffix == ".json" else yaml.safe_dump(doc))
    out = tmp_path / "plan.yaml"
    assert_bad_input(run_cli("recommend", "--stats", stats, "-o", out), stats, field, message, out)


def test_truncated_stats(tmp_path, valid_stats):
    text = json.dumps(valid_stats)
    stats = tmp_path / "stats.json"
    stats.write_text(text[: len(text) // 2])
    assert_bad_input(run_cli("recommend", "--stats", stats), stats, "line", "invalid JSON")


@pytest.fixture(scope="module")
def valid_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    plan = folder / "plan.yaml"
    assert run_cli("recommend", recipe, "-o", plan).exit_code == 0
    return recipe, yaml.safe_load(plan.read_text())


PLAN_CASES = [
    ("lpcli", DELETE, "lpcli", "missing header"),
    ("lpcli.version", 7, "lpcli.version", "newer than this lpcli"),
    ("lpcli.kind", "stats", "lpcli.kind", "expected 'plan'"),
    ("layers", DELETE, "layers", "missing"),
    ("layers", {}, "layers", "has no layers"),
    ("layers.5", {"weight": "fx8.7", "activation": "fx8.4", "error": "fx8.7", "weight_grad": "fx8.7"},
     "layers.5", "no layer '5'"),
    ("layers.0.weight", DELETE, "layers.0.weight", "missing"),
    ("layers.0.bias", "fx8.7", "layers.0.bias", "unknown key"),
    ("layers.0.wieght", "fx8.7", "layers.0.wieght", "did you mean 'weight'"),
    ("layers.0", "fx8.7", "layers.0", "must be a mapping"),
    ("softmax_input", DELETE, "softmax_input", "missing"),
    ("softmax_error", "fx8", "softmax_error", "unknown format"),
    ("softmax_error_rows", "zero_sum", "softmax_error_rows", "did you mean 'zero-sum'"),
    ("softmax_error_rows", True, "softmax_error_rows", "non-empty string"),
    ("output_layer", "9", "output_layer", "names no layer"),
    ("layers.2.activation", "fx12.2", "layers.2.activation", "softmax_input"),
    ("optimizer.kahan", "on", "optimizer.kahan", "true or false"),
    ("optimizer.lr", 0.1, "optimizer.lr", "unknown key"),
    ("optimizer.comp_format", "fx0.3", "optimizer.comp_format", "width"),
    ("classes", 0, "classes", ">= 2"),
    ("extra", 1, "extra", "unknown key"),
    ("layers.0.momentum", "fx99.1", "layers.0.momentum", "width"),
    ("layers.0.input", "int8", "layers.0.input", "unknown format"),
    ("layers.0.weight_grad", "mxint8", "layers.0.weight_grad", "block (MX) format"),
    ("layers.0.parameters", "0.weight", "layers.0.parameters", "list of parameter names"),
    ("layers.0.parameters", [1], "layers.0.parameters", "list of parameter names"),
    ("layers.0.parameters", ["0.weight", "0.bais"], "layers.0.parameters", "no trainable parameter '0.bais'"),
    ("layers.0.parameters", ["0.weight"], "layers", "0.bias"),
    ("layers.2.parameters", ["2.weight", "2.bias", "0.bias"], "layers.2.parameters", "already stored by"),
    ("keep_fp32", "0.bias", "keep_fp32", "list of parameter names"),
    ("keep_fp32", ["0.bias"], "keep_fp32", "already stored by"),
    ("keep_fp32", ["nope"], "keep_fp32", "no trainable parameter 'nope'"),
    ("tied", ["a"], "tied", "must be a mapping"),
    ("tied", {"a": 1}, "tied", "parameter names"),
]
FORMAT_STRINGS = ["fx25.3", "fx2", "fx8.7.1", "fx-8.3", "fxa.b", "dfx", "dfx30", "e0m3", "e9m2", "e4m24",
                  "e4m3fnuz", "e8m7fn", "fp64", "fp8", "int8", "float16", "bfloat16", "fx8.200", "FX8,7", "8.7"]


@pytest.mark.parametrize("path,value,field,message",
                         PLAN_CASES + [("layers.0.error", spec, "layers.0.error", "") for spec in FORMAT_STRINGS],
                         ids=[f"{c[0]}={c[1]!r}"[:60] for c in PLAN_CASES] + FORMAT_STRINGS)
def test_bad_plan(tmp_path, valid_plan, path, value, field, message):
    recipe, doc = valid_plan
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(mutated(doc, path, value)))
    out = tmp_path / "report.json"
    assert_bad_input(run_cli("train-check", recipe, "--plan", plan, "-o", out), plan, field, message, out)


def npz_cases():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 64)), np.arange(40) % 10
    return [
        ("no x", {"y": y}, "x", "missing array 'x'"),
        ("no y", {"x": x}, "y", "missing array 'y'"),
        ("1-d x", {"x": x[:, 0], "y": y}, "x", "shape"),
        ("empty", {"x": x[:0], "y": y[:0]}, "x", "non-empty"),
        ("nan", {"x": np.where(x > 2, np.nan, x), "y": y}, "x", "NaN or inf"),
        ("inf", {"x": np.where(x > 2, np.inf, x), "y": y}, "x", "NaN or inf"),
        ("strings", {"x": x.astype(str), "y": y}, "x", "numeric"),
        ("float labels", {"x": x, "y": y.astype(float)}, "y", "integer"),
        ("2-d labels", {"x": x, "y": y[:, None]}, "y", "1-d"),
        ("length mismatch", {"x": x, "y": y[:30]}, "y", "30 labels for 40 samples"),
        ("negative labels", {"x": x, "y": y - 1}, "y", ">= 0"),
        ("test without labels", {"x": x, "y": y, "x_test": x}, "y_test", "come together"),
        ("test shape", {"x": x, "y": y, "x_test": x[:, :10], "y_test": y}, "x_test", "sample shape"),
        ("test mismatch", {"x": x, "y": y, "x_test": x, "y_test": y[:5]}, "y_test", "5 labels"),
        ("outside classes", {"x": x, "y": y * 2}, "y", "outside the 10 classes"),
    ]


@pytest.mark.parametrize("case", npz_cases(), ids=lambda c: c[0])
def test_bad_npz(tmp_path, case):
    _, arrays, field, message = case
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(mutated(BASE, "data", {"name": "npz", "path": "data.npz", "classes": 10})))
    assert_bad_input(run_cli("analyze", recipe), data, field, message)


def npz_cases_without_classes():
    """Cases where the recipe declares no data.classes, so labels are remapped, or that need
    a data option: (id, arrays, extra data keys, field, message)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 64)), np.arange(40) % 10
    tokens = rng.integers(0, 100, size=(40, 64))
    return [
        ("one label", {"x": x, "y": np.full(40, 3)}, {}, "y", "single label 3 in y"),
        ("one label with test", {"x": x, "y": np.full(40, 7), "x_test": x[:8], "y_test": np.full(8, 7)}, {},
         "y", "single label 7 in y and y_test"),
        ("one label as tokens", {"x": tokens, "y": np.full(40, 12)}, {"standardize": False}, "y", "single label"),
        ("ids beyond int64", {"x": np.full((40, 64), 2**63 + 5, dtype=np.uint64), "y": y}, {}, "x", "beyond int64"),
        ("raw beyond float32", {"x": np.where(x > 2, 1e39, x), "y": y}, {"standardize": False}, "x", "float32"),
        ("complex", {"x": x.astype(complex), "y": y}, {}, "x", "must be real"),
        ("bool labels", {"x": x, "y": y > 4}, {}, "y", "integer"),
        ("too few to split", {"x": tokens[:3], "y": np.arange(3)}, {}, "x", "at least 4 samples"),
        ("test without labels", {"x": tokens, "y": y, "x_test": tokens}, {"standardize": True}, "y_test",
         "come together"),
    ]


@pytest.mark.parametrize("case", npz_cases_without_classes(), ids=lambda c: c[0])
def test_bad_npz_without_declared_classes(tmp_path, case):
    _, arrays, extra, field, message = case
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(mutated(BASE, "data", {"name": "npz", "path": "data.npz", **extra})))
    out = tmp_path / "stats.yaml"
    assert_bad_input(run_cli("analyze", recipe, "-o", out), data, field, message, out)


def test_npz_with_one_label_and_declared_classes_is_not_refused_for_it(tmp_path):
    """Declared classes keep today's behaviour: labels are taken as given."""
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(40, 64)), y=np.full(40, 3))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(mutated(BASE, "data", {"name": "npz", "path": "data.npz", "classes": 10})))
    result = run_cli("analyze", recipe, "--steps", "2", "-o", tmp_path / "stats.yaml")
    assert result.exit_code == 0, result.stderr


def test_npz_that_is_not_npz(tmp_path):
    (tmp_path / "data.npz").write_text("not a zip file")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(mutated(BASE, "data", {"name": "npz", "path": "data.npz"})))
    assert_bad_input(run_cli("analyze", recipe), recipe, "data.path", "cannot read")


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.array([object()] * 4, dtype=object), y=np.arange(4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(mutated(BASE, "data", {"name": "npz", "path": "data.npz"})))
    assert_bad_input(run_cli("analyze", recipe), recipe, "data.path", "pickle")


CLI_CASES = [
    (("train-check", "--weight-bits", "1"), "--weight-bits"),
    (("train-check", "--weight-bits", "25"), "--weight-bits"),
    (("train-check", "--error-bits", "many"), "--error-bits"),
    (("train-check", "--tolerance", "-1"), "--tolerance"),
    (("train-check", "--steps", "0"), "--steps"),
    (("train-check", "--seed", "abc"), "--seed"),
    (("train-check", "--frobnicate"), "--frobnicate"),
    (("train-check", "digits-mlp", "extra-argument"), "extra-argument"),
    (("analyze", "--steps", "-5"), "--steps"),
    (("recommend", "--headroom", "99"), "--headroom"),
    (("recommend", "--max-bits", "1"), "--max-bits"),
    (("recommend", "--stats"), "--stats"),
    (("train-chek",), "train-chek"),
    (("formats", "--json", "--yaml"), "--yaml"),
]


@pytest.mark.parametrize("args,field", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_command_line(args, field):
    assert_bad_input(run_cli(*args), "command line", field)


def test_bad_paths_on_the_command_line(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert_bad_input(run_cli("train-check", "--plan", missing), missing, "", "file not found")
    assert_bad_input(run_cli("recommend", "--stats", missing), missing, "", "file not found")
    assert_bad_input(run_cli("analyze", missing), missing, "", "file not found")
    out = tmp_path / "no" / "such" / "dir" / "out.yaml"
    assert_bad_input(run_cli("analyze", "-o", out), out, "", "does not exist")
    assert_bad_input(run_cli("recommend", "-o", tmp_path), tmp_path, "", "is a directory")
    assert_bad_input(run_cli("train-check", "digits-mpl"), "digits-mpl", "", "did you mean 'digits-mlp'")


# (path, required): None at an optional leaf means "the default", which is valid.
LEAVES = [("training.lr", True), ("training.batch_size", True), ("training.steps", True),
          ("training.momentum", False), ("data.name", True), ("model.layers.0.in", True),
          ("model.layers.2.out", True), ("model.layers.0.type", True)]
WRONG = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                  st.integers(), max_size=2), st.none(), st.booleans(), st.floats(max_value=-1e-9))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(leaf=st.sampled_from(LEAVES), value=WRONG, unknown=st.text(alphabet="abcdefghij_", min_size=1, max_size=8))
def test_generated_bad_recipes(tmp_path, leaf, value, unknown):
    """Any wrongly typed value at a required leaf, or an unknown key, is refused in one line."""
    path, required = leaf
    if (value is None and not required) or (path == "data.name" and value in ("digits", "synthetic", "npz")):
        return
    recipe = tmp_path / "generated.yaml"
    doc = mutated(BASE, path, value)
    recipe.write_text(yaml.safe_dump(doc))
    result = run_cli("recommend", recipe)
    assert_bad_input(result, recipe, path.split(".")[0])
    if unknown not in ("model", "data", "training", "precision", "description"):
        recipe.write_text(yaml.safe_dump({**BASE, unknown: 1}))
        assert_bad_input(run_cli("recommend", recipe), recipe, unknown, "unknown key")
