from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lpcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


class Result:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    def json(self):
        return json.loads(self.stdout)


def run_cli(*args: str) -> Result:
    """Invoke the real Typer app; stdout and stderr apart."""
    runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module single-threaded: on a shared 2-core machine a 2-thread torch op waits
    for a core another process holds, which made the format tests 10x slower under load."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A test on the fused C kernels and again on the torch kernels (``usefixtures`` it)."""
    from lpcli import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "_kernels", None)
    elif kernels._kernels is None:
        pytest.skip("the C kernels are not built (no C compiler at install, or LPCLI_KERNELS=torch)")
    return request.param


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def small_recipe(tmp_path: Path):
    """Write a quick variant of digits-mlp (few steps) and return its path; kwargs override sections."""
    def make(name: str = "small.yaml", **sections) -> Path:
        recipe = yaml.safe_load((RECIPES / "digits-mlp.yaml").read_text())
        recipe["training"].update(steps=60, analyze_steps=10)
        recipe.pop("check")  # one seed: quick
        for key, value in sections.items():
            recipe[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe))
        return path
    return make


def assert_same_run(a, b):
    """Two optimizer runs ``(params, optimizer)`` ended in the same bits: weights, every
    state tensor and the diagnostics."""
    import torch

    pa, oa = a
    pb, ob = b
    assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(pa, pb, strict=True))
    for x, y in zip(pa, pb, strict=True):
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert oa.diagnostics() == ob.diagnostics()


def run_optimizer(make, shapes, steps=30, split=None, skip=()):
    """Seeded parameters of ``shapes`` and gradients, ``steps`` steps of ``make(params)``;
    at step ``split`` the state is saved, loaded into a fresh optimizer over fresh copies of
    the parameters, and training goes on (a resume); tensor 1 gets no gradient at the steps
    in ``skip``. Returns (params, optimizer) for :func:`assert_same_run`."""
    import copy

    import torch

    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s) * 0.4) for s in shapes]
    grads = [[torch.randn(s) * 0.05 for s in shapes] for _ in range(steps)]
    opt = make(params)
    for i, gs in enumerate(grads):
        if split is not None and i == split:
            saved = copy.deepcopy(opt.state_dict())
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = make(params)
            opt.load_state_dict(saved)
        for j, (p, g) in enumerate(zip(params, gs, strict=True)):
            p.grad = None if j == 1 and i in skip else g.clone()
        opt.step()
    return params, opt


def assert_diagnostics_change_no_bit(off, on, p, q, steps: int = 10) -> None:
    """``off`` (diagnostics off, over ``p``) and ``on`` (over ``q``, equal to ``p``) take the
    same small updates: the weights end equal, and ``off`` keeps none of the sums."""
    import torch

    for _ in range(steps):
        p.grad = torch.full_like(p, -0.1)
        q.grad = torch.full_like(q, -0.1)
        off.step()
        on.step()
    assert torch.equal(p.detach(), q.detach())
    assert off.diagnostics()[0]["lost_mass"] is None and "intended" not in off.state[p]
