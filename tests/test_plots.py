"""PNG figures of a report and a plan (the optional matplotlib extra)."""

from __future__ import annotations

import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lpcli import analyze, load_recipe, recommend, train_check
from lpcli.errors import InputError
from lpcli.formats import parse_format
from lpcli.plots import DPI, FIGSIZE, check_available, plot_check, plot_plan
from lpcli.results import Location


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    import yaml

    from conftest import RECIPES

    doc = yaml.safe_load((RECIPES / "digits-mlp.yaml").read_text())
    doc["training"].update(steps=60, analyze_steps=5)
    path = tmp_path_factory.mktemp("plots") / "small.yaml"
    path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(path)
    return train_check(recipe, recommend(analyze(recipe)), stochastic=True)


def test_check_figures_have_their_pixel_size(report, tmp_path):
    import matplotlib.image

    out = tmp_path / "figures" / "nested"  # made when missing
    paths = plot_check(report, out)
    assert [p.name for p in paths] == ["check-loss.png", "check-diagnostics.png"]
    width, height = round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI)
    assert png_size(paths[0]) == (width, height)
    assert png_size(paths[1]) == (width, round(FIGSIZE[1] * 1.5 * DPI))
    pixels = matplotlib.image.imread(paths[0])
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    assert sorted(p.name for p in out.iterdir()) == ["check-diagnostics.png", "check-loss.png"]  # no temp files


def test_plan_figure(report, tmp_path):
    layers = {**report.plan.layers, "0": {**report.plan.layers["0"], "weight": parse_format("bf16"),
                                          "error": parse_format("dfx8"), "weight_grad": parse_format("fp32")}}
    (path,) = plot_plan(replace(report.plan, layers=layers), tmp_path, prefix="mine")
    assert path == tmp_path / "mine-widths.png"
    assert png_size(path) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_diverged_and_partial_reports_still_draw(report, tmp_path):
    plain = replace(report.runs["plain"], diverged_at=30, diverged_in=Location("0", "error"), test_accuracy=None,
                    loss_curve=[2.3, float("nan")])
    broken = replace(report, runs={**report.runs, "plain": plain},
                     diagnostics={name: {"lost_updates": {"plain": None, "kahan": 0.5}} for name in report.diagnostics})
    assert len(plot_check(broken, tmp_path)) == 2


def test_existing_file_is_not_a_directory(report, tmp_path):
    target = tmp_path / "file.png"
    target.write_text("x")
    with pytest.raises(InputError, match="directory"):
        plot_check(report, target)
    with pytest.raises(InputError, match="directory"):
        check_available(target)
    check_available(tmp_path / "not yet")
    assert not (tmp_path / "not yet").exists()


def test_without_matplotlib_the_message_says_how_to_install(report, monkeypatch, tmp_path):
    for name in ("matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    with pytest.raises(InputError) as missing:
        plot_check(report, tmp_path / "out")
    assert str(missing.value) == "command line: --plot: needs matplotlib: pip install 'lpcli[plot]'"
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="lpcli\\[plot\\]"):
        plot_plan(report.plan, tmp_path)
    with pytest.raises(InputError, match="lpcli\\[plot\\]"):
        check_available()
