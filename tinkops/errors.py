"""The error tree: every tinkops error derives from TinkopsError, grouped by failure domain."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TinkopsError(Exception):
    """The root of every error tinkops raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file of the repository, with where it is and how to fix it."""

    file: str
    line: int | None
    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )
        return f"{text}; {self.fix}" if self.fix else text


class InvalidContent(TinkopsError):
    """Repository content (hardware, template, request) is invalid; ``problems`` lists why."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class RenderError(TinkopsError):
    """A template could not be rendered; ``line`` is the template line, when known."""

    def __init__(self, message: str, line: int | None = None, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.fix = fix


class NotFound(TinkopsError):
    """A workflow, template or hardware record does not exist."""


class TransportError(TinkopsError):
    """Talking to git or to the provisioner over SSH failed."""


class ConfigError(TinkopsError):
    """The provisioner's or the CLI's configuration is missing or invalid."""
