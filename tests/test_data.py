"""Datasets: MNIST-1D through its package (offline), and the message without it."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import yaml

from lpcli.data import load_data
from lpcli.recipe import load_recipe

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
