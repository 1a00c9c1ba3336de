"""The README's Python example runs as written, and its stats file feeds the CLI."""

from __future__ import annotations

import re

from conftest import ROOT, run_cli


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}  # one session: a later block uses what an earlier one made
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "tensor([0.0000, 0.2500])" in printed
    assert "(fp32 logits " in printed and "accumulators of 0, 2: every GEMM" in printed
    result = run_cli("recommend", "--stats", tmp_path / "stats.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    plan = result.json()
    assert set(plan["layers"]) == {"0", "2"} and plan["output_layer"] == "2"
