"""The exceptions that end a run with one sentence, and the `data.on_error` choice.

Every module may import this one: it imports nothing heavier than the standard library, so data and model code
raise `ConfigError` or `SampleError` without pulling in Hydra. The entrypoints turn them into exit codes
(`cli.exit_on_user_error`).
"""

import difflib
from typing import Any

ON_ERROR = ("raise", "skip")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


class SampleError(ValueError):
    """A sample that cannot be used; the message names where it came from and what to do."""


class RunStopped(Exception):
    """A run that ends early on purpose, with one sentence and an exit code: it diverged (1), a checkpoint could not
    be written (1), a stop signal was honoured after saving (128 + the signal), or it had already finished (0)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
        self.logged = False  # True once the sentence is in the run's log (cli.exit_on_user_error then skips it)

    def __reduce__(self) -> tuple:  # keeps the exit code when broadcast to other ranks
        return (type(self), (str(self), self.exit_code))


def reason(err: BaseException, line: int = 0) -> str:
    """One line of `err`'s message for a sentence (`line`: which; -1 for the last, where a library puts the cause),
    or its type's name when the message is empty."""
    return (str(err).strip().splitlines() or [type(err).__name__])[line]


def check_on_error(on_error: Any) -> None:
    """ConfigError unless `on_error` is one of ON_ERROR (data.on_error: what a bad sample does)."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={on_error}: choose raise or skip.")


def closest(word: str, options: list[str]) -> str:
    """` (did you mean a or b?)` for the options closest to a mistyped `word`, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
