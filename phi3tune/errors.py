"""User-facing exceptions. Each carries the exit code README ("Commands") promises and a hint saying what to do."""

from __future__ import annotations


class Phi3TuneError(Exception):
    """Base of every error that is shown to the user as a message, never as a traceback."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(Phi3TuneError):
    """Bad usage, config or data: exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more problems in the config file; ``problems`` holds every one of them."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        where = f" in {source}" if source else ""
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}{where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))
        self.problems = problems


class DataError(UsageError):
    """Invalid data rows or files."""


class ResourceError(Phi3TuneError):
    """Missing GPU, out of memory, weights that cannot be fetched: exit 3."""

    exit_code = 3


class NonFiniteLossError(ResourceError):
    """Training produced NaN/inf; the run stopped before saving anything non-finite."""


class TrainingInterrupted(Phi3TuneError):
    """SIGINT/SIGTERM arrived; a complete checkpoint was saved. Exit 130 or 143."""

    def __init__(self, message: str, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code
