"""The small exception tree. The CLI turns every `HpsearchError` into one line and exit code 2."""

from __future__ import annotations


class HpsearchError(Exception):
    """A problem the user can fix: bad input, a missing file, an unreachable storage."""


class ConfigError(HpsearchError):
    """A study file that cannot be read or does not validate. Lists every problem at once."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        n = len(problems)
        head = f"{path}: {n} problem{'s' if n != 1 else ''}: " if n > 1 else f"{path}: "
        super().__init__(head + "; ".join(problems))


class DataError(HpsearchError):
    """A dataset that cannot be found, downloaded or parsed."""


class StorageError(HpsearchError):
    """A storage URL that is malformed or unreachable, or a study that does not match."""
