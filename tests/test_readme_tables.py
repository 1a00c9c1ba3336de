"""The README's benchmark tables reproduce: the cheap scripts are re-run and every row they
print must be the row the README shows (slow: about a minute; ``pytest -m slow``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lpcli.kernels import kernel_backend

from conftest import ROOT

pytestmark = pytest.mark.slow


def readme_block_after(command: str) -> list[str]:
    """The lines of the first fenced block after the README paragraph naming ``command``."""
    readme = (ROOT / "README.md").read_text()
    assert command in readme, f"the README does not name {command!r}"
    tail = readme.split(command, 1)[1]
    block = tail.split("```", 2)[1]
    return [line.rstrip() for line in block.splitlines()[1:] if line.strip()]


def run(script: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)
    assert result.returncode == 0, result.stderr
    return [line.rstrip() for line in result.stdout.splitlines()]


@pytest.mark.skipif(kernel_backend() != "native", reason="the README's stochastic column is the C kernels' stream")
def test_weight_width_rows_match_the_readme():
    shown = readme_block_after("benchmarks/weight_widths.py --widths 4 5 6 8 10 12 16")
    printed = run("weight_widths.py", "--widths", "5", "8")
    for width in ("5", "8"):
        row = next(line for line in printed if line.split()[:1] == [width])
        assert row in shown, f"README row for W={width} differs; the script now prints:\n{row}"


def test_schedule_stall_rows_match_the_readme():
    shown = readme_block_after("benchmarks/schedule_stall.py` (about 10 s)")
    printed = run("schedule_stall.py")
    rows = [line for line in printed if line[:5].strip().isdigit()]
    assert rows and all(row in shown for row in rows), "\n".join(rows)


def test_objective_rows_match_the_readme():
    """benchmarks/objectives.py on the two recipes where the energy objective moves a layer
    (each analyzes in seconds; nothing is trained)."""
    readme = (ROOT / "README.md").read_text()
    printed = run("objectives.py", "digits-cnn", "synthetic-100")
    rows = [line for line in printed if line.startswith("| digits-cnn") or line.startswith("| synthetic-100")]
    assert len(rows) == 2 and all(row in readme for row in rows), "\n".join(rows)
