"""Loading YAML the way Tinkerbell's Go loaders read it: every scalar stays the text written.

PyYAML's default loaders follow YAML 1.1, so ``0600`` becomes 384, ``true`` becomes True and a
MAC made of decimal octets becomes a base-60 integer. Here every scalar is a ``str`` (a plain
``null``, ``~`` or empty value is None), and each value keeps the line it came from, so
validation can point at it. Hostile input (huge, binary, deeply nested, alias bombs,
duplicate keys) is rejected with a Problem instead of a crash or a hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from tinkops.errors import Problem

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64

# libyaml's parser and emitter are about 15 times faster than PyYAML's pure-Python ones and
# produce the same nodes and marks; the pure-Python ones serve where libyaml is missing.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

Path_ = tuple[str | int, ...]


@dataclass
class Document:
    """A loaded YAML document: plain values, and the line of each value by its path."""

    file: str
    value: Any
    lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """Return the line of ``path``, or of its nearest parent that has one."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


class _Budget:
    def __init__(self) -> None:
        self.nodes = 0


def load(file: str, data: bytes, problems: list[Problem]) -> Document | None:
    """Parse ``data`` (the content of ``file``); append any problem and return None on failure."""
    if len(data) > MAX_FILE_BYTES:
        problems.append(
            Problem(
                file,
                None,
                "",
                f"file is {len(data)} bytes, over the limit of {MAX_FILE_BYTES}",
                "split it or remove unused content",
            )
        )
        return None
    if b"\0" in data:
        problems.append(
            Problem(
                file,
                None,
                "",
                "file is binary (contains NUL bytes)",
                "store only YAML text here",
            )
        )
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        problems.append(
            Problem(
                file,
                None,
                "",
                f"file is not UTF-8 text ({error.reason} at byte {error.start})",
                "save it as UTF-8",
            )
        )
        return None

    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        if "nesting depth" in str(error.problem):
            # libyaml stops at 1,000 levels before Python would recurse that deep.
            problems.append(
                Problem(
                    file,
                    line,
                    "",
                    "YAML is nested too deeply",
                    f"keep nesting under {MAX_DEPTH} levels",
                )
            )
            return None
        problems.append(
            Problem(
                file,
                line,
                "",
                f"invalid YAML: {error.problem or error}",
                "fix the syntax (quote values that contain ': ', '{' or '#')",
            )
        )
        return None
    except yaml.YAMLError as error:
        problems.append(Problem(file, None, "", f"invalid YAML: {error}", "fix the syntax"))
        return None
    except RecursionError:
        problems.append(
            Problem(
                file,
                None,
                "",
                "YAML is nested too deeply",
                f"keep nesting under {MAX_DEPTH} levels",
            )
        )
        return None

    document = Document(file, None)
    if node is None:
        return document
    try:
        document.value = _convert(node, (), document, _Budget(), 0)
    except _Rejected as rejected:
        problems.append(rejected.problem(file))
        return None
    return document


class _Rejected(Exception):
    def __init__(self, line: int | None, message: str, fix: str) -> None:
        self.line, self.message, self.fix = line, message, fix

    def problem(self, file: str) -> Problem:
        return Problem(file, self.line, "", self.message, self.fix)


def _convert(node: yaml.Node, path: Path_, document: Document, budget: _Budget, depth: int) -> Any:
    budget.nodes += 1
    line = node.start_mark.line + 1
    if budget.nodes > MAX_NODES:
        raise _Rejected(
            line,
            f"document expands to more than {MAX_NODES} values (an alias bomb or a generated file)",
            "write the values out plainly",
        )
    if depth > MAX_DEPTH:
        raise _Rejected(
            line, f"YAML is nested deeper than {MAX_DEPTH} levels", "flatten the structure"
        )
    document.lines.setdefault(path, line)

    if isinstance(node, yaml.ScalarNode):
        if node.style in (None, "") and node.value in ("", "~", "null", "Null", "NULL"):
            return None
        return node.value
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(item, (*path, index), document, budget, depth + 1)
            for index, item in enumerate(node.value)
        ]
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Rejected(
                    key_node.start_mark.line + 1,
                    "a mapping key must be a plain scalar",
                    "use a string key",
                )
            key = key_node.value
            if key_node.tag == "tag:yaml.org,2002:merge" or key == "<<":
                raise _Rejected(
                    key_node.start_mark.line + 1,
                    "merge keys ('<<') are not supported",
                    "write the keys out",
                )
            if key in result:
                raise _Rejected(
                    key_node.start_mark.line + 1,
                    f"duplicate key {key!r}",
                    "remove one of the two",
                )
            document.lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _convert(value_node, (*path, key), document, budget, depth + 1)
        return result
    raise _Rejected(line, f"unsupported YAML node {type(node).__name__}", "use plain YAML")


def dump(value: Any) -> str:
    """Return ``value`` as block YAML that loads back as the same strings."""
    return yaml.dump(
        value,
        Dumper=_DUMPER,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )
