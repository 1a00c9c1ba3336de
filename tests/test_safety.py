"""Safety rules of the package, checked on its source: documents are parsed with safe
loaders, tensors and arrays never unpickle, and code runs only from an explicit
``import:`` model entry."""

from __future__ import annotations

import re

from conftest import ROOT

SOURCES = {path.name: path.read_text() for path in (ROOT / "lpcli").glob("*.py")}


def test_yaml_only_through_the_safe_loader():
    for name, text in SOURCES.items():
        for call in re.findall(r"yaml\.(\w+)\(", text):
            assert call in ("safe_load", "safe_dump"), f"{name}: yaml.{call}"


def test_no_unpickling():
    for name, text in SOURCES.items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{name}: {call}"
        assert "allow_pickle=True" not in text, name
        assert "pickle" not in re.sub(r"allow_pickle=False|#.*|\"\"\".*?\"\"\"", "", text, flags=re.S), name
    assert "allow_pickle=False" in SOURCES["data.py"]


def test_code_runs_only_from_an_import_entry():
    for name, text in SOURCES.items():
        assert not re.search(r"(?<![.\w])(eval|exec|compile|__import__)\(", text), name
        assert "subprocess" not in text and "os.system" not in text, name
        if "importlib.import_module" in text:
            assert name == "models.py", name
