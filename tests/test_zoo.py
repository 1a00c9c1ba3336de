"""Acceptance tests for arbitrary user models: the zoo in ``zoo.py`` through the real CLI.

Every zoo model runs ``analyze -o stats.yaml``, ``recommend --stats stats.yaml -o
plan.yaml`` and ``train-check --plan plan.yaml --json -o report.json`` from a recipe in a
temporary folder that imports ``zoo:<factory>`` (``tests/`` is on ``sys.path`` under
pytest, see ``test_recipes_in_tmp_path_can_import_the_zoo``). The main bar: every plan
covers every trainable parameter exactly once, either in a layer's ``parameters`` list
(the parameters that layer's weight format stores) or in the top-level ``keep_fp32``.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
import zoo
from torch import nn

from conftest import Result, run_cli

TESTS = Path(__file__).resolve().parent
RUNS = ("fp32", "plain", "kahan")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as the CLI runs: as fast for these models, far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args: Any) -> Result:
    """``run_cli``, with an exception escaping the app turned into exit code -1 and its
    traceback on stderr, so that one failing command fails its tests instead of erroring
    every test of the module."""
    try:
        return run_cli(*args)
    except Exception as exc:  # reported through the result
        return Result(-1, "", "".join(traceback.format_exception(exc)))


def tail(result: Result) -> str:
    return f"exit {result.exit_code}; stderr: ...{result.stderr[-1500:]}"


@dataclass
class Chain:
    """One zoo model through analyze, recommend and train-check, with its files."""

    name: str
    entry: zoo.Entry
    recipe: Path
    stats_path: Path
    plan_path: Path
    report_path: Path
    analyze: Result
    recommend: Result
    check: Result

    def plan(self) -> dict[str, Any]:
        assert self.recommend.exit_code == 0, f"recommend failed: {tail(self.recommend)}"
        assert self.plan_path.exists(), "recommend wrote no plan"
        return yaml.safe_load(self.plan_path.read_text())

    def report(self) -> dict[str, Any]:
        assert self.check.exit_code in (0, 1, 3), f"train-check failed: {tail(self.check)}"
        assert self.report_path.exists(), "train-check wrote no report"
        return json.loads(self.report_path.read_text())


def run_chain(name: str, directory: Path) -> Chain:
    entry = zoo.ZOO[name]
    recipe = zoo.write_recipe(directory, name, entry)
    stats, plan, report = directory / "stats.yaml", directory / "plan.yaml", directory / "report.json"
    analyzed = invoke("analyze", recipe, "-o", stats)
    recommended = invoke("recommend", recipe, "--stats", stats, "-o", plan)
    checked = invoke("train-check", recipe, "--plan", plan, "--json", "-o", report)
    return Chain(name, entry, recipe, stats, plan, report, analyzed, recommended, checked)


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Chain]:
    """``chains(name)``: the zoo model's chain, run once per module on first use."""
    done: dict[str, Chain] = {}

    def get(name: str) -> Chain:
        if name not in done:
            done[name] = run_chain(name, tmp_path_factory.mktemp(name))
        return done[name]
    return get


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def planned(plan: dict[str, Any]) -> list[str]:
    """Every name the plan stores or keeps in fp32, with repeats."""
    names = [n for layer in plan["layers"].values() for n in layer.get("parameters", [])]
    return names + list(plan.get("keep_fp32") or [])


def layer_of(plan: dict[str, Any], parameter: str) -> str | None:
    for layer, entry in plan["layers"].items():
        if parameter in entry.get("parameters", []):
            return layer
    return None


# ----------------------------------------------------------------------------- the zoo itself


def test_recipes_in_tmp_path_can_import_the_zoo() -> None:
    """``import: "zoo:..."`` from a recipe anywhere works because pytest (prepend import mode,
    ``tests/`` without ``__init__.py``) put ``tests/`` on ``sys.path``; the imported module is
    this very ``zoo``."""
    assert TESTS in {Path(entry).resolve() for entry in sys.path if entry}
    assert Path(zoo.__file__).resolve() == TESTS / "zoo.py"


@pytest.mark.parametrize("name", sorted(zoo.ZOO) + sorted(zoo.BAD))
def test_zoo_models_map_their_data_to_one_logit_per_class(name: str, tmp_path: Path) -> None:
    entry = {**zoo.ZOO, **zoo.BAD}[name]
    classes = entry.data(tmp_path / "d.npz", 0)
    arrays = zoo.load_npz(tmp_path / "d.npz")
    assert set(arrays) == {"x", "y", "x_test", "y_test"}
    assert arrays["y"].dtype == arrays["y_test"].dtype == "int64"
    assert set(arrays["y"]) == set(range(classes))
    x = torch.from_numpy(arrays["x"][:4])
    out = entry.build()(x)
    if name in zoo.BAD:
        assert isinstance(out, dict) and out["logits"].shape == (4, classes)
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (4, classes)


def test_zoo_models_have_the_structure_under_test(tmp_path: Path) -> None:
    transformer = zoo.ZOO["token_transformer"].build()
    assert isinstance(transformer.encoder.self_attn, nn.MultiheadAttention)
    assert "pos" in dict(transformer.named_parameters(recurse=False))
    assert "encoder.self_attn.in_proj_weight" in trainable(transformer)
    zoo.ZOO["token_transformer"].data(tmp_path / "tokens.npz", 0)
    tokens = zoo.load_npz(tmp_path / "tokens.npz")
    assert tokens["x"].dtype == "int64" and tokens["x"].ndim == 2
    for name, cell in (("lstm", nn.LSTM), ("gru", nn.GRU)):
        model = zoo.ZOO[name].build()
        assert isinstance(model.rnn, cell) and not hasattr(model.rnn, "weight")
    tied = zoo.ZOO["tied_shared"].build()
    assert tied.a.weight is tied.b.weight
    assert "b.weight" not in trainable(tied)
    assert {n for n, _ in tied.named_parameters(remove_duplicate=False)} - trainable(tied) == {"b.weight"}
    calls: list[int] = []
    tied.shared.register_forward_hook(lambda *_: calls.append(1))
    tied(torch.zeros(2, 8))
    assert len(calls) == 2
    scaled = zoo.ZOO["temperature"].build()
    assert scaled.scale.ndim == 0 and "scale" in dict(scaled.named_parameters(recurse=False))
    cnn = zoo.ZOO["bn_residual_cnn"].build()
    assert any(isinstance(m, nn.BatchNorm2d) for m in cnn.modules())


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_tasks_are_learnable_in_plain_torch(name: str, tmp_path: Path) -> None:
    """fp32 SGD at the entry's settings, without lpcli (float features standardized as the
    npz loader does, integer ids as they are), ends well above chance."""
    entry = zoo.ZOO[name]
    entry.data(tmp_path / "d.npz", 0)
    arrays = zoo.load_npz(tmp_path / "d.npz")
    x, x_test = arrays["x"], arrays["x_test"]
    if x.dtype.kind == "f":
        mean, std = x.mean(axis=0), x.std(axis=0)
        std[std == 0] = 1.0
        x, x_test = (x - mean) / std, (x_test - mean) / std
    xs, xs_test = torch.from_numpy(x), torch.from_numpy(x_test)
    y, y_test = torch.from_numpy(arrays["y"]), torch.from_numpy(arrays["y_test"])
    t = entry.training
    torch.manual_seed(t["seed"])
    model = entry.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"])
    generator = torch.Generator().manual_seed(t["seed"])
    batch = t["batch_size"]
    for step in range(t["steps"]):
        if step % (len(y) // batch) == 0:
            order = torch.randperm(len(y), generator=generator)
        index = order[(step % (len(y) // batch)) * batch:][:batch]
        loss = F.cross_entropy(model(xs[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xs_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= entry.min_fp32_accuracy


# ----------------------------------------------------------------------------- through the CLI


ALL = pytest.mark.parametrize("name", sorted(zoo.ZOO))


@ALL
def test_chain_runs_and_writes_its_files(chains: Callable[[str], Chain], name: str) -> None:
    chain = chains(name)
    assert chain.analyze.exit_code == 0, f"analyze failed: {tail(chain.analyze)}"
    assert yaml.safe_load(chain.stats_path.read_text())["lpcli"]["kind"] == "stats"
    assert chain.recommend.exit_code == 0, f"recommend failed: {tail(chain.recommend)}"
    assert chain.plan()["lpcli"]["kind"] == "plan"
    report = chain.report()
    assert chain.check.json() == report
    assert chain.check.exit_code == {"passed": 0, "failed": 1, "inconclusive": 3}[report["verdict"]["status"]]


@ALL
def test_report_has_the_runs_diagnostics_and_verdict(chains: Callable[[str], Chain], name: str) -> None:
    chain = chains(name)
    plan, report = chain.plan(), chain.report()
    for run in RUNS:
        accuracy = report["runs"][run]["test_accuracy"]
        assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0, (run, accuracy)
    assert set(report["diagnostics"]) >= set(plan["layers"])
    assert set(report["plan"]["layers"]) == set(plan["layers"])
    verdict = report["verdict"]
    assert verdict["reason"] and verdict["passed"] == (verdict["status"] == "passed")
    fp32, kahan = (report["runs"][run]["test_accuracy"] for run in ("fp32", "kahan"))
    lost, gained = verdict["discordant"]["fp32_only"], verdict["discordant"]["kahan_only"]
    n = verdict["test_examples"]
    assert n == report["data"]["test"]
    assert round((fp32 - kahan) * n) == lost - gained  # the paired counts are the runs' own
    assert verdict["loss_interval"][0] <= verdict["loss_points"] <= verdict["loss_interval"][1]


@ALL
def test_fp32_learns_the_task(chains: Callable[[str], Chain], name: str) -> None:
    chain = chains(name)
    accuracy = chain.report()["runs"]["fp32"]["test_accuracy"]
    assert accuracy >= chain.entry.min_fp32_accuracy


@ALL
def test_plan_covers_every_trainable_parameter_exactly_once(chains: Callable[[str], Chain], name: str) -> None:
    """The main bar: layers' ``parameters`` plus ``keep_fp32`` are the model's trainable
    parameters (tied aliases counted once, under their canonical name), none twice."""
    chain = chains(name)
    plan = chain.plan()
    names = planned(plan)
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert not repeated, f"named twice in the plan: {repeated}"
    expected = trainable(chain.entry.build())
    assert set(names) == expected, (f"missing: {sorted(expected - set(names))}; "
                                    f"unknown: {sorted(set(names) - expected)}")
    for layer, entry in plan["layers"].items():
        assert isinstance(entry.get("parameters"), list), f"layer {layer!r} has no parameters list"


@ALL
def test_plan_reports_ties_only_where_there_are_some(chains: Callable[[str], Chain], name: str) -> None:
    """``tied`` maps each alias to the name its Parameter was first registered under;
    absent or empty for a model without ties."""
    chain = chains(name)
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for qualified, p in chain.entry.build().named_parameters(remove_duplicate=False):
        if id(p) in canonical:
            aliases[qualified] = canonical[id(p)]
        canonical.setdefault(id(p), qualified)
    assert (chain.plan().get("tied") or {}) == aliases


def test_tied_weight_is_reported_and_stored_once(chains: Callable[[str], Chain]) -> None:
    plan = chains("tied_shared").plan()
    assert plan.get("tied") == {"b.weight": "a.weight"}
    assert "b.weight" not in planned(plan)
    assert "a.weight" in planned(plan)
    assert layer_of(plan, "shared.0.weight") is not None, "the shared block (called twice) has no layer"


def test_transformer_plans_attention_and_the_positional_table(chains: Callable[[str], Chain]) -> None:
    plan = chains("token_transformer").plan()
    attention = [name for name in plan["layers"] if name.endswith("self_attn")]
    assert attention, f"no layer for the MultiheadAttention module: {sorted(plan['layers'])}"
    assert "encoder.self_attn.in_proj_weight" in plan["layers"][attention[0]]["parameters"]
    assert "pos" in planned(plan), "the root module's positional parameter is not in the plan"


def test_learnable_scalar_on_the_root_module_is_planned(chains: Callable[[str], Chain]) -> None:
    assert "scale" in planned(chains("temperature").plan())


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_layer_lists_its_weights(chains: Callable[[str], Chain], name: str) -> None:
    plan = chains(name).plan()
    assert "rnn" in plan["layers"], f"no layer for the {name.upper()} module: {sorted(plan['layers'])}"
    assert set(plan["layers"]["rnn"]["parameters"]) == {
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"}


# ----------------------------------------------------------------------------- a model lpcli cannot run


COMMANDS = pytest.mark.parametrize("command", [
    ("analyze", "-o", "out.yaml"),
    ("recommend", "-o", "out.yaml"),
    ("train-check", "--json", "-o", "out.json"),
], ids=["analyze", "recommend", "train-check"])


def run_dict_output(command: tuple[str, ...], directory: Path) -> tuple[Result, Path, Path]:
    """Run ``command`` on a recipe (``recipe.yaml``, in a folder whose name does not contain
    the model's) importing the dict-returning model; returns the result, the recipe and the
    output path it was given."""
    directory = directory / "case"
    directory.mkdir()
    recipe = zoo.write_recipe(directory, "recipe", zoo.BAD["dict_output"])
    verb, *options = command
    output = directory / options[-1]
    return invoke(verb, recipe, *options[:-1], output), recipe, output


@COMMANDS
def test_dict_output_is_bad_input_for_every_command(command: tuple[str, ...], tmp_path: Path) -> None:
    """A forward that returns a dict: exit 2, one line on stderr naming the recipe file,
    no traceback, nothing written."""
    result, recipe, output = run_dict_output(command, tmp_path)
    assert result.exit_code == 2, tail(result)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(recipe) in lines[0] or recipe.name in lines[0], lines[0]
    assert not output.exists()


@COMMANDS
def test_dict_output_error_names_the_model(command: tuple[str, ...], tmp_path: Path) -> None:
    """The one line names the model itself (its import target, factory or class), not only
    the recipe's ``model`` field."""
    result, recipe, _ = run_dict_output(command, tmp_path)
    assert result.exit_code == 2, tail(result)
    line = result.stderr.strip().replace(str(recipe), "<recipe>")
    assert any(name in line for name in ("zoo:dict_output", "dict_output", "DictOutput")), line


def test_reports_of_a_deep_model_fit_80_columns(chains: Callable[[str], Chain],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The transformer's train-check and plan as the CLI prints them at 80 columns: no line
    wider, no cell cut short, and the float32 list there."""
    chain = chains("token_transformer")
    monkeypatch.setenv("COLUMNS", "80")
    checked = invoke("train-check", chain.recipe, "--plan", chain.plan_path)
    recommended = invoke("recommend", chain.recipe, "--stats", chain.stats_path)
    assert checked.exit_code in (0, 1, 3) and recommended.exit_code == 0, tail(checked) + tail(recommended)
    text = checked.stdout + recommended.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = [line for line in text.splitlines() if line.startswith(" encoder") or line.startswith(" (root)")]
    assert rows and not any("…" in row.split()[-1] for row in rows)  # values are never elided, names may be
    assert "left in float32" in text and "out_proj: its forward never ran" in text


def test_long_models_are_summarised_unless_full() -> None:
    from rich.console import Console

    from lpcli.formats import parse_format
    from lpcli.plan import TENSORS, Plan
    from lpcli.report import SHOWN_LAYERS, render_plan

    layers = {f"blocks.{i}.mlp.fc": {t: parse_format("fx8.4") for t in TENSORS} for i in range(30)}
    plan = Plan(layers=layers, softmax_input=parse_format("fx6.2"), softmax_error=parse_format("fx5.4"))
    for full, shown in ((False, SHOWN_LAYERS), (True, 30)):
        console = Console(width=80, record=True)
        render_plan(plan, console, full=full)
        text = console.export_text()
        assert sum(f"blocks.{i}.mlp.fc " in text for i in range(30)) == shown
        assert ("--full shows every layer" in text) == (not full)


def test_float32_list_comes_from_the_model_and_plan(chains: Callable[[str], Chain]) -> None:
    """BatchNorm's running statistics are listed; integer token ids (nothing to round) and
    roles that held no value are not."""
    bn = chains("bn_residual_cnn").report()["kept_fp32"]
    assert any(item.startswith("buffers (") and "running_mean" in item for item in bn)
    tokens = chains("token_transformer").report()["kept_fp32"]
    assert not any(item.startswith("layer (root)") or item.startswith("layer embed") for item in tokens)
