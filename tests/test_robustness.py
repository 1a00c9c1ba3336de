"""Interruptions, divergence and determinism, through the real command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import RECIPES, ROOT, run_cli


def test_same_seed_gives_byte_identical_json(small_recipe):
    recipe = small_recipe()
    outputs = []
    for _ in range(3):
        result = run_cli("train-check", recipe, "--json", "--seed", "5")
        doc = json.loads(result.stdout)
        assert set(doc["timing"]) == {"seconds"}
        doc.pop("timing")
        outputs.append(json.dumps(doc, indent=2).encode())
    assert outputs[0] == outputs[1] == outputs[2]
    other = json.loads(run_cli("train-check", recipe, "--json", "--seed", "6").stdout)
    other.pop("timing")
    assert json.dumps(other, indent=2).encode() != outputs[0]


def test_divergence_is_reported_with_step_layer_and_tensor(small_recipe):
    recipe = small_recipe(training={"lr": 1e4, "batch_size": 32, "steps": 60, "analyze_steps": 1})
    result = run_cli("train-check", recipe, "--json", "--plan", _plan_without_kahan_clipping(recipe))
    assert result.exit_code == 1
    assert "NaN" not in result.stdout and "nan" not in result.stdout.lower().replace("non_finite", "")
    report = json.loads(result.stdout)
    fp32 = report["runs"]["fp32"]
    assert fp32["diverged"] is True
    assert isinstance(fp32["diverged_at"], int) and 1 <= fp32["diverged_at"] <= 60
    assert fp32["diverged_in"]["layer"] in ("0", "2", "loss")
    assert fp32["diverged_in"]["tensor"] in ("activation", "error", "weight_grad", "weight", "loss")
    assert fp32["test_accuracy"] is None and fp32["final_loss"] is None
    assert report["verdict"]["passed"] is False and "diverged" in report["verdict"]["reason"]
    human = run_cli("train-check", recipe, "--plan", _plan_without_kahan_clipping(recipe))
    assert human.exit_code == 1 and "diverged at step" in human.stdout


def _plan_without_kahan_clipping(recipe):
    """A plan in float formats (which overflow to inf instead of saturating)."""
    plan = recipe.parent / "float-plan.yaml"
    if not plan.exists():
        run_cli("recommend", recipe, "-o", plan)
        doc = yaml.safe_load(plan.read_text())
        for layer in doc["layers"].values():
            layer.update(weight="fp16", activation="fp16", error="fp16", weight_grad="fp16")
        doc["softmax_input"] = doc["softmax_error"] = "fp16"
        plan.write_text(yaml.safe_dump(doc))
    return plan


def test_sigint_keeps_the_previous_file_and_exits_130(tmp_path):
    recipe = yaml.safe_load((RECIPES / "digits-mlp.yaml").read_text())
    recipe["training"]["steps"] = 200_000
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "report.json"
    out.write_text('{"previous": true}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LPCLI_PROGRESS_EVERY": "0.2"}
    # The child starts with Python's own Ctrl-C handler: it inherits an ignored SIGINT when the
    # fork happens while another thread of this process ignores SIGINT and SIGQUIT for a moment
    # (as C's system() does), which was seen in full runs (the child's SigIgn had both set).
    launch = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "runpy.run_module('lpcli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launch, "train-check", str(path), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    # Wait until the fp32 run reports progress (imports, data, analysis and plan come first and
    # take seconds, more on a busy machine); the training would take far longer.
    started = None
    for line in proc.stderr:
        if line.startswith("lpcli: fp32"):
            started = line
            break
    assert started and proc.poll() is None, proc.communicate()
    # A Ctrl-C that lands inside a C extension's import can be swallowed there: press again
    # until the process answers, as a person would.
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert "stopped in the fp32 run at step" in stderr
    assert out.read_text() == '{"previous": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.yaml", "report.json"]
