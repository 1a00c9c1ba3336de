"""The real CLI on the bundled recipes, and its handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lpcli.formats import parse_format

from conftest import RECIPES, ROOT, run_cli


@pytest.fixture(scope="module")
def mlp_report():
    result = run_cli("train-check", RECIPES / "digits-mlp.yaml", "--json")
    return result


def test_train_check_digits_mlp_json(mlp_report):
    assert mlp_report.exit_code == 0, mlp_report.stderr
    report = mlp_report.json()
    for run in ("fp32", "plain", "kahan"):
        assert 0.0 <= report["runs"][run]["test_accuracy"] <= 1.0
        assert report["runs"][run]["final_loss"] > 0
    assert report["runs"]["fp32"]["test_accuracy"] >= 0.93
    assert set(report["diagnostics"]) == set(report["plan"]["layers"]) == {"0", "2"}
    for layer in report["diagnostics"].values():
        assert set(layer["lost_updates"]) == {"plain", "kahan"}
        assert set(layer["lost_mass"]) == {"plain", "kahan"}
    assert report["plan"]["lpcli"] == {"kind": "plan", "version": 1}
    gap = report["runs"]["fp32"]["test_accuracy"] - report["runs"]["kahan"]["test_accuracy"]
    assert report["verdict"]["passed"] == (gap * 100 <= 1.0)
    assert set(report["softmax"]["kahan"]) >= {"logits_saturated", "non_target_errors_flushed"}


def test_narrow_weights_plain_loses_and_kahan_keeps():
    """At 7 weight bits plain SGD drops nearly every update; Kahan stays within a point."""
    result = run_cli("train-check", "digits-mlp", "--weight-bits", "7", "--json")
    report = result.json()
    runs = report["runs"]
    assert runs["fp32"]["test_accuracy"] - runs["plain"]["test_accuracy"] > 0.05
    assert runs["fp32"]["test_accuracy"] - runs["kahan"]["test_accuracy"] <= 0.01
    assert result.exit_code == 0
    for name, layer in report["diagnostics"].items():
        assert report["plan"]["layers"][name]["weight"].startswith("fx7.")
        assert layer["lost_mass"]["plain"] > 0.9 > 0.2 > layer["lost_mass"]["kahan"]


def test_five_bit_weights_pass_with_the_sized_compensation():
    """digits-mlp at 5 weight bits: plain SGD stays near chance, Kahan passes (its compensation
    sized from the updates; the weights' width would drop most of them)."""
    result = run_cli("train-check", "digits-mlp", "--weight-bits", "5", "--json")
    report = result.json()
    assert result.exit_code == 0, report["verdict"]
    assert report["runs"]["plain"]["test_accuracy"] < 0.5
    for layer in report["plan"]["layers"].values():
        weight, comp = parse_format(layer["weight"]), parse_format(layer["compensation"])
        assert weight.width == 5 and comp.max_value < weight.step <= -comp.min_value


def test_adamw_with_warmup_and_cosine_passes_train_check():
    """digits-adamw: torch's AdamW for fp32, KahanAdamW with the plan's moment and compensation
    formats for the low-precision runs, the same warmup and cosine schedule for all."""
    result = run_cli("train-check", "digits-adamw", "--json")
    report = result.json()
    assert result.exit_code == 0, report["verdict"]
    assert report["training"]["lr"] == 0.003
    for layer in report["plan"]["layers"].values():
        assert layer["momentum"] != "fp32" and layer["variance"] != "fp32"
    assert report["runs"]["plain"]["test_accuracy"] < report["runs"]["kahan"]["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_narrowest_weights_against_fp32_over_seeds(seed):
    """Issue bar: 5 weight bits pass and 4 stay within 2 points of fp32, seeds 0-2."""
    five = run_cli("train-check", "digits-mlp", "--weight-bits", "5", "--seed", seed, "--json")
    assert five.exit_code == 0, five.json()["verdict"]
    four = run_cli("train-check", "digits-mlp", "--weight-bits", "4", "--seed", seed, "--json").json()
    assert four["runs"]["kahan"]["gap_to_fp32"] <= 0.02


def test_failed_check_exits_1(small_recipe):
    result = run_cli("train-check", small_recipe(), "--weight-bits", "2", "--json")
    assert result.exit_code == 1
    assert result.json()["verdict"]["passed"] is False


def test_human_output_has_runs_diagnostics_and_verdict(small_recipe):
    result = run_cli("train-check", small_recipe())
    assert "Runs" in result.stdout and "Diagnostics per layer" in result.stdout
    status = {0: "PASSED", 1: "FAILED", 3: "INCONCLUSIVE"}[result.exit_code]
    assert f"{status}: Kahan" in result.stdout and "95% interval" in result.stdout


def test_seeds_pool_the_paired_counts_of_each_seed(small_recipe, tmp_path):
    """--seeds 2 runs seeds 0 and 1 on one plan; each seed's table is the one a single-seed
    check of it gives, and the verdict is computed on their sum."""
    from lpcli.paired import PairedCounts, loss_interval

    recipe, plan = small_recipe(), tmp_path / "plan.yaml"
    assert run_cli("recommend", recipe, "-o", plan, "--quiet").exit_code == 0
    pooled = run_cli("train-check", recipe, "--plan", plan, "--seeds", "2", "--json", "--quiet")
    doc = pooled.json()["verdict"]
    assert [s["seed"] for s in doc["seeds"]] == [0, 1]
    for seed in (0, 1):
        single = run_cli("train-check", recipe, "--plan", plan, "--seed", str(seed), "--json",
                         "--quiet").json()["verdict"]
        assert single["seeds"] == [doc["seeds"][seed]]
    lost = sum(s["discordant"]["fp32_only"] for s in doc["seeds"])
    gained = sum(s["discordant"]["kahan_only"] for s in doc["seeds"])
    assert doc["discordant"] == {"fp32_only": lost, "kahan_only": gained}
    assert doc["test_examples"] == 2 * pooled.json()["data"]["test"]
    counts = PairedCounts(doc["concordant"]["both_right"], lost, gained, doc["concordant"]["both_wrong"])
    assert doc["loss_interval"] == [100 * b for b in loss_interval(counts)]
    assert pooled.exit_code == {"passed": 0, "failed": 1, "inconclusive": 3}[doc["status"]]


def test_inconclusive_exits_3_and_says_how_much_more_evidence(small_recipe):
    """A tolerance of 0 can never pass; with the Kahan run gaining or losing only a few
    examples the interval straddles it."""
    result = run_cli("train-check", small_recipe(), "--tolerance", "0", "--json", "--quiet")
    verdict = result.json()["verdict"]
    assert verdict["status"] != "passed"
    if verdict["status"] == "inconclusive":
        assert result.exit_code == 3 and verdict["loss_interval"][0] <= 0 < verdict["loss_interval"][1]
        assert "evidence_needed" in verdict and "would" in verdict["reason"]
    else:
        assert result.exit_code == 1 and verdict["loss_interval"][0] > 0


def test_progress_lines_where_stderr_is_not_a_terminal(small_recipe, monkeypatch):
    monkeypatch.setenv("LPCLI_PROGRESS_EVERY", "0")
    recipe = small_recipe()
    shown = run_cli("train-check", recipe, "--json")
    lines = shown.stderr.splitlines()
    assert any(line.startswith("lpcli: kahan: step 60/60, ") and line.endswith("s elapsed") for line in lines)
    assert shown.json()["verdict"]["status"]  # stdout stays JSON alone
    assert run_cli("train-check", recipe, "--json", "--quiet").stderr == ""
    monkeypatch.setenv("LPCLI_PROGRESS_EVERY", "soon")
    bad = run_cli("train-check", recipe, "--json")
    assert bad.exit_code == 2 and bad.stdout == ""
    assert bad.stderr == "error: environment: LPCLI_PROGRESS_EVERY: must be a number of seconds >= 0, got 'soon'\n"


def test_recommend_softmax_wider_for_100_classes():
    digits = run_cli("recommend", "digits-mlp", "--json").json()
    synthetic = run_cli("recommend", "synthetic-100", "--json").json()
    width = lambda spec: int(spec[2:].split(".")[0])  # noqa: E731
    assert width(synthetic["softmax_input"]) > width(digits["softmax_input"])
    assert width(synthetic["softmax_error"]) > width(digits["softmax_error"])
    assert "N=100" in synthetic["reasons"]["softmax_input"]
    assert "N=10," in digits["reasons"]["softmax_input"]


def test_recommend_from_stats_file_alone_equals_from_recipe(tmp_path):
    stats = tmp_path / "stats.yaml"
    assert run_cli("analyze", "digits-mlp", "-o", stats).exit_code == 0
    from_file = run_cli("recommend", "--stats", stats, "--json").json()
    from_recipe = run_cli("recommend", "digits-mlp", "--json").json()
    assert from_file["layers"] == from_recipe["layers"]
    assert from_file["softmax_input"] == from_recipe["softmax_input"]


def test_analyze_writes_stats_with_header(tmp_path):
    out = tmp_path / "stats.json"
    result = run_cli("analyze", "digits-cnn", "--steps", "5", "-o", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["lpcli"] == {"kind": "stats", "version": 1}
    assert doc["classes"] == 10
    assert set(doc["layers"]) == {"1", "2", "5", "9"}
    for layer in doc["layers"].values():
        for kind in ("weight", "activation", "error", "weight_grad", "update"):
            assert layer[kind]["absmax"] >= layer[kind]["p99"] >= layer[kind]["p50"] >= 0
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temporary file left


def test_plan_round_trip_through_train_check(tmp_path, small_recipe):
    recipe = small_recipe()
    plan = tmp_path / "plan.yaml"
    assert run_cli("recommend", recipe, "-o", plan).exit_code == 0
    doc = yaml.safe_load(plan.read_text())
    doc["layers"]["0"]["weight"] = "fx9.8"
    plan.write_text(yaml.safe_dump(doc))
    report = run_cli("train-check", recipe, "--plan", plan, "--json").json()
    assert report["plan"]["layers"]["0"]["weight"] == "fx9.8"


def test_softmax_error_rows_of_the_plan_reach_the_simulation(tmp_path):
    """digits-mlp with a 4-bit softmax error: zero-sum rows (the default) and rounding every
    entry train differently; the plan's choice is carried into the report."""
    plan = tmp_path / "plan.yaml"
    assert run_cli("recommend", "digits-mlp", "-o", plan).exit_code == 0
    doc = yaml.safe_load(plan.read_text())
    assert doc["softmax_error_rows"] == "zero-sum"
    doc["softmax_error"] = doc["layers"][doc["output_layer"]]["error"] = "fx4.3"
    reports = {}
    for rows in ("zero-sum", "each"):
        doc["softmax_error_rows"] = rows
        plan.write_text(yaml.safe_dump(doc))
        reports[rows] = run_cli("train-check", "digits-mlp", "--plan", plan, "--steps", 150, "--json").json()
        assert reports[rows]["plan"]["softmax_error_rows"] == rows
    kahan = [reports[rows]["runs"]["kahan"]["final_loss"] for rows in ("zero-sum", "each")]
    assert kahan[0] != kahan[1]


def test_output_replaces_existing_file(tmp_path, small_recipe):
    out = tmp_path / "report.json"
    out.write_text("old")
    run_cli("train-check", small_recipe(), "-o", out, "--json")
    assert json.loads(out.read_text())["runs"]


def test_same_seed_same_numbers(small_recipe):
    recipe = small_recipe()
    first = run_cli("train-check", recipe, "--json", "--seed", "3").json()
    second = run_cli("train-check", recipe, "--json", "--seed", "3").json()
    first.pop("timing"), second.pop("timing")
    assert first == second


BAD_RECIPES = {
    "unknown key": ({"trainin": {}}, "trainin", "did you mean 'training'"),
    "bad lr": ({"training": {"lr": -1, "batch_size": 8, "steps": 5}}, "training.lr", "must be > 0"),
    "bad format": ({"precision": {"weight": "fx99.3"}}, "precision.weight", "fixed-point width"),
    "unknown format": ({"precision": {"softmax_input": "int8"}}, "precision.softmax_input", "fx<W>.<F>"),
    "bad layer type": ({"model": {"layers": [{"type": "lstm"}]}}, "model.layers[0].type", "must be one of"),
    "wrong shape": ({"model": {"layers": [{"type": "linear", "in": 5, "out": 10}]}}, "model",
                    "does not accept"),
    "wrong classes": ({"model": {"layers": [{"type": "linear", "in": 64, "out": 7}]}}, "model", "10 classes"),
    "bad data": ({"data": {"name": "mnist"}}, "data.name", "must be one of"),
    "missing layer": ({"precision": {"layers": {"7": {"weight": "fx8.7"}}}}, "precision.layers.7",
                      "no layer '7'"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_exits_2_with_one_line(case, small_recipe):
    sections, field, message = BAD_RECIPES[case]
    path = small_recipe(**sections)
    result = run_cli("recommend", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and field in lines[0] and message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_files_exit_2(tmp_path, small_recipe):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    cases = [
        (("train-check", tmp_path / "missing.yaml"), "file not found"),
        (("train-check", broken), "invalid YAML"),
        (("train-check", "digits-mpl"), "did you mean 'digits-mlp'"),
    ]
    future = tmp_path / "stats.yaml"
    future.write_text(yaml.safe_dump({"lpcli": {"kind": "stats", "version": 99}}))
    cases.append((("recommend", "--stats", future), "newer than this lpcli"))
    plan = tmp_path / "plan.yaml"
    run_cli("recommend", small_recipe(), "-o", plan)
    doc = yaml.safe_load(plan.read_text())
    doc["layers"]["5"] = doc["layers"]["0"]
    plan.write_text(yaml.safe_dump(doc))
    cases.append((("train-check", small_recipe(), "--plan", plan), "layers.5"))
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.stdout)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    out = tmp_path / "never.json"
    assert run_cli("train-check", broken, "-o", out).exit_code == 2
    assert not out.exists()


def test_python_m_lpcli_and_formats_listing():
    result = subprocess.run([sys.executable, "-m", "lpcli", "formats", "--json"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    rows = {row["format"]: row for row in json.loads(result.stdout)}
    assert rows["fp8-e4m3"]["max"] == 448.0 and rows["fx8.7"]["bits"] == 8
    assert rows["mxfp4-e2m1/16"]["stored bits"] == 4.5 and rows["mxint8"]["scaled"] == "per block"
    assert subprocess.run([sys.executable, "-m", "lpcli", "formats"], capture_output=True, text=True,
                          check=True).stdout.count("per block") == 2 * 7
    help_text = subprocess.run([sys.executable, "-m", "lpcli", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for command in ("analyze", "recommend", "train-check"):
        assert command in help_text


def test_output_files_get_ordinary_permissions(tmp_path, small_recipe):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "stats.yaml"
        assert run_cli("analyze", small_recipe(), "--steps", "2", "-o", fresh).exit_code == 0
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.yaml"
        kept.write_text("old")
        kept.chmod(0o600)
        assert run_cli("analyze", small_recipe(), "--steps", "2", "-o", kept).exit_code == 0
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    finally:
        os.umask(umask)


def test_resnet_from_an_import_path_passes_with_qualified_layer_names():
    from torch import nn

    from lpcli.models import build_model
    from lpcli.recipe import load_recipe

    result = run_cli("train-check", "resnet-digits", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["verdict"]["passed"]
    recipe = load_recipe("resnet-digits")
    model = build_model(recipe.model, recipe.source, recipe.base_dir)
    wanted = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert wanted == {"stem.conv", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2", "head"}
    assert wanted <= set(report["plan"]["layers"])
    assert report["plan"]["output_layer"] == "head"
