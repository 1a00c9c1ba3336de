"""The one error type for bad input: it names the file and the field at fault."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InputError(Exception):
    """Input that lpcli cannot use; the CLI prints it as one line and exits 2."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = ": ".join(part for part in (source, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with what had finished: the CLI reports it and exits 130."""

    def __init__(self, run: str, step: int, total: int, finished: dict[str, float | None] | None = None) -> None:
        super().__init__(run, step, total)
        self.run, self.step, self.total = run, step, total
        self.finished = finished or {}

    def describe(self) -> str:
        done = ", ".join(f"{name} ({'diverged' if acc is None else f'test accuracy {acc:.2%}'})"
                         for name, acc in self.finished.items()) or "no run"
        return f"stopped in the {self.run} run at step {self.step} of {self.total}; finished: {done}"
