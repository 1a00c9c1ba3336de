"""Reading and writing lpcli's YAML/JSON documents: format by extension, atomic writes.

Every document carries a header ``lpcli: {kind: <kind>, version: <n>}`` so that a
file from a newer lpcli, or a plan given where stats are expected, is refused with a
clear message instead of being misread.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

SCHEMA_VERSION = 1


def header(kind: str) -> dict[str, Any]:
    return {"kind": kind, "version": SCHEMA_VERSION}


def is_json(path: str | Path) -> bool:
    return str(path).lower().endswith(".json")


def read_document(path: str | Path) -> Any:
    """Parse a YAML or JSON file (JSON by extension, YAML otherwise) with safe loaders."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(str(path), "", "file not found") from None
    except IsADirectoryError:
        raise InputError(str(path), "", "is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(str(path), "", f"cannot read: {exc}") from None
    try:
        if is_json(path):
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"line {exc.lineno}", f"invalid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(str(path), where, f"invalid YAML: {problem}") from None


def check_header(doc: Any, source: str, kind: str) -> dict[str, Any]:
    """Return ``doc`` as a mapping after checking its ``lpcli`` header names ``kind``."""
    if not isinstance(doc, dict):
        raise InputError(source, "", f"expected a {kind} document (a mapping), got {type(doc).__name__}")
    head = doc.get("lpcli")
    if not isinstance(head, dict) or "kind" not in head or "version" not in head:
        raise InputError(source, "lpcli", f"missing header; a {kind} file starts with "
                         f"'lpcli: {{kind: {kind}, version: {SCHEMA_VERSION}}}'")
    if head["kind"] != kind:
        raise InputError(source, "lpcli.kind", f"this is a {head['kind']!r} file, expected {kind!r}")
    version = head["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(source, "lpcli.version", f"must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise InputError(source, "lpcli.version",
                         f"version {version} is newer than this lpcli understands ({SCHEMA_VERSION}); upgrade lpcli")
    return doc


def dumps(doc: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(_json_safe(doc), indent=2) + "\n"
    return yaml.safe_dump(_json_safe(doc), sort_keys=False, default_flow_style=None, width=100)


def write_document(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as JSON or YAML (by extension) atomically: a reader sees the old
    file or the new one, never a part of either."""
    write_text_atomic(Path(path), dumps(doc, is_json(path)))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``.

    The file gets the mode a plain ``open`` would give it (an existing file's mode, else
    0666 less the umask), not mkstemp's private 0600.
    """
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(str(path), "", f"directory {str(directory)!r} does not exist")
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_safe(value: Any) -> Any:
    """Plain Python types only; non-finite floats become None so JSON stays valid."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return str(value)
