"""Data-parallel train-check under torchrun (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml

from lpcli import analyze, load_recipe, recommend, train_check
from lpcli.distributed import GradientSum, World, first_problem, is_main_process, setup, shard
from lpcli.files import write_document

from conftest import RECIPES, ROOT


def test_shards_cover_the_global_batch_in_order():
    index = torch.arange(11)
    parts = [shard(index, World(rank, 3, "gloo")) for rank in range(3)]
    assert torch.equal(torch.cat(parts), index)
    assert [len(p) for p in parts] == [4, 4, 3]
    assert shard(index, World()) is index


def test_alone_nothing_is_initialized(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    world, device = setup("cpu")
    assert world == World() and not world.distributed and device == torch.device("cpu")
    assert not dist.is_initialized()
    assert is_main_process()
    model = torch.nn.Linear(2, 2)
    hooks = GradientSum(model, world)
    assert hooks._handles == []
    assert first_problem(("0", "error"), world, device) == ("0", "error")


def test_only_rank_zero_is_main(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_processes_give_the_single_process_verdict(tmp_path):
    doc = yaml.safe_load((RECIPES / "digits-mlp.yaml").read_text())
    doc["training"].update(steps=75, analyze_steps=5)
    recipe_path = tmp_path / "small.yaml"
    recipe_path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(recipe_path)
    plan = recommend(analyze(recipe))
    plan_path = tmp_path / "plan.yaml"
    write_document(plan_path, plan.document())

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    command = ["-m", "lpcli", "train-check", str(recipe_path), "--plan", str(plan_path), "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    parallel = json.loads(result.stdout)  # one document: only rank 0 printed

    single = train_check(recipe, plan).document()
    assert parallel["device"] == {"type": "cpu", "processes": 2, "backend": "gloo"}
    assert parallel["verdict"]["passed"] == single["verdict"]["passed"]
    assert result.returncode == (0 if single["verdict"]["passed"] else 1), result.stderr[-4000:]
    for run, summary in single["runs"].items():
        assert abs(parallel["runs"][run]["test_accuracy"] - summary["test_accuracy"]) <= 0.01, run
        assert parallel["runs"][run]["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-3), run
        assert parallel["runs"][run]["loss_curve"]["values"] == pytest.approx(summary["loss_curve"]["values"],
                                                                              rel=1e-3)
    # shares from the counters summed over the ranks: those of one process
    for layer, diagnostics in single["diagnostics"].items():
        for key, per_run in diagnostics.items():
            for run, value in per_run.items():
                other = parallel["diagnostics"][layer][key][run]
                assert (value is None) == (other is None), (layer, key, run)
                if value is not None:
                    assert other == pytest.approx(value, abs=0.01), (layer, key, run)
