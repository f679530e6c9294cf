"""Typed reads from a loaded YAML document, collecting every problem instead of stopping.

Each reader returns a value of the requested type, or None after appending a Problem that
names the file, the line, the field path, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from typing import Any

from tinkops.errors import Problem
from tinkops.yamltext import Document, Path_

# A record's name (a file name without extension, or a template a request names): Tinkerbell's
# 1 to 199 bytes, in characters that are safe in a file name, a ref name and a command line.
RECORD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,198}$")
RECORD_NAME_RULE = (
    "use letters, digits, '.', '_' and '-' (at most 199), starting with a letter or digit"
)
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_TRUE = frozenset({"true", "True", "TRUE", "yes", "on"})
_FALSE = frozenset({"false", "False", "FALSE", "no", "off"})


def field_name(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class Reader:
    """Reads typed values out of one Document, appending problems to a shared list."""

    def __init__(self, document: Document, problems: list[Problem]) -> None:
        self.document = document
        self.problems = problems

    @property
    def file(self) -> str:
        return self.document.file

    def problem(self, path: Path_, message: str, fix: str = "") -> None:
        self.problems.append(
            Problem(self.file, self.document.line(path), field_name(path), message, fix)
        )

    def get(self, path: Path_) -> Any:
        value: Any = self.document.value
        for part in path:
            if isinstance(part, int):
                if not isinstance(value, list) or part >= len(value):
                    return None
                value = value[part]
            else:
                if not isinstance(value, dict):
                    return None
                value = value.get(part)
        return value

    def mapping(
        self,
        path: Path_,
        allowed: Collection[str] | None = None,
        required: Collection[str] = (),
        *,
        optional: bool = False,
    ) -> dict[str, Any] | None:
        """Return the mapping at ``path``, checking its keys against ``allowed``."""
        value = self.get(path)
        if value is None:
            if not optional:
                self.problem(path, "missing", "add this mapping")
            return None
        if not isinstance(value, dict):
            self.problem(
                path, f"expected a mapping, found {_describe(value)}", "write key: value pairs"
            )
            return None
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    self.problem((*path, key), f"unknown key {key!r}", _suggest(key, allowed))
        for key in required:
            if value.get(key) is None:
                self.problem((*path, key), "missing required field", f"add {key!r}")
        return value

    def sequence(self, path: Path_, *, optional: bool = True) -> list[Any]:
        value = self.get(path)
        if value is None:
            if not optional:
                self.problem(path, "missing", "add a list")
            return []
        if not isinstance(value, list):
            self.problem(
                path,
                f"expected a list, found {_describe(value)}",
                "write one '- item' per line",
            )
            return []
        return value

    def string(self, path: Path_, *, optional: bool = True) -> str | None:
        value = self.get(path)
        if value is None:
            if not optional:
                self.problem(path, "missing required field", "add a value")
            return None
        if not isinstance(value, str):
            self.problem(
                path, f"expected a text value, found {_describe(value)}", "write a single value"
            )
            return None
        return value

    def integer(
        self, path: Path_, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.string(path)
        if value is None:
            return None
        if not _INTEGER.match(value.strip()):
            self.problem(path, f"{value!r} is not a whole number", "write digits only, e.g. 60")
            return None
        number = int(value)
        if minimum is not None and number < minimum:
            self.problem(
                path, f"{number} is below the minimum of {minimum}", f"use {minimum} or more"
            )
            return None
        if maximum is not None and number > maximum:
            self.problem(
                path, f"{number} is above the maximum of {maximum}", f"use {maximum} or less"
            )
            return None
        return number

    def boolean(self, path: Path_) -> bool | None:
        value = self.string(path)
        if value is None:
            return None
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        self.problem(path, f"{value!r} is not true or false", "write true or false")
        return None

    def string_list(self, path: Path_) -> tuple[str, ...] | None:
        """Return the list of strings at ``path``, or None when it is absent."""
        if self.get(path) is None:
            return None
        items = []
        for index, item in enumerate(self.sequence(path)):
            if isinstance(item, str):
                items.append(item)
            elif item is None:
                items.append("")
            else:
                self.problem(
                    (*path, index),
                    f"expected a text value, found {_describe(item)}",
                    "quote the item",
                )
        return tuple(items)

    def string_map(self, path: Path_) -> dict[str, str]:
        """Return the mapping of strings at ``path`` (environment), values kept as written."""
        value = self.mapping(path, optional=True)
        if not value:
            return {}
        result: dict[str, str] = {}
        for key, item in value.items():
            if item is None:
                result[key] = ""
            elif isinstance(item, str):
                result[key] = item
            else:
                self.problem(
                    (*path, key),
                    f"expected a text value, found {_describe(item)}",
                    "quote the value",
                )
        return result


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r}"


def _suggest(key: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "remove it; valid keys are " + ", ".join(sorted(allowed))


def require_mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}
