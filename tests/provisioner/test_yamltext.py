"""Loading YAML with scalars kept as text, and rejecting hostile documents."""

from __future__ import annotations

import pytest

from tinkops.errors import Problem
from tinkops.yamltext import MAX_FILE_BYTES, dump, load


def loaded(text: str | bytes) -> tuple[object, list[Problem]]:
    problems: list[Problem] = []
    data = text.encode() if isinstance(text, str) else text
    document = load("f.yaml", data, problems)
    return (document.value if document else None), problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("MODE: 0600", {"MODE": "0600"}),
        ("FLAG: true", {"FLAG": "true"}),
        ("mac: 52:54:00:12:34:56", {"mac": "52:54:00:12:34:56"}),
        ("n: 1e3", {"n": "1e3"}),
        ("empty:", {"empty": None}),
        ('quoted: "null"', {"quoted": "null"}),
    ],
)
def test_scalars_stay_text(text: str, expected: dict[str, object]) -> None:
    value, problems = loaded(text)
    assert problems == []
    assert value == expected


def test_lines_recorded_for_nested_values() -> None:
    problems: list[Problem] = []
    document = load("f.yaml", b"a:\n  b:\n    - x\n    - y\n", problems)
    assert document is not None
    assert document.line(("a", "b", 1)) == 4
    assert document.line(("a", "missing")) == 1


@pytest.mark.parametrize(
    ("data", "fragment", "line"),
    [
        (b"a: [1, 2\n", "invalid YAML", 2),
        (b"a: 1\na: 2\n", "duplicate key 'a'", 2),
        (b"\x00\x01binary", "binary", None),
        (b"\xff\xfe\xfa", "not UTF-8", None),
        (b"base: &b {x: 1}\nother:\n  <<: *b\n", "merge keys", 3),
        (b"x" * (MAX_FILE_BYTES + 1), "over the limit", None),
        (b"[" * 5000 + b"]" * 5000, "nested", 1),
    ],
)
def test_hostile_documents_rejected(data: bytes, fragment: str, line: int | None) -> None:
    value, problems = loaded(data)
    assert value is None
    assert len(problems) == 1
    assert fragment in problems[0].message
    assert problems[0].line == line


def test_alias_bomb_rejected() -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 9):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    value, problems = loaded("\n".join(lines))
    assert value is None
    assert "more than" in problems[0].message


def test_dump_round_trips_ambiguous_strings() -> None:
    original = {"MODE": "0600", "FLAG": "true", "mac": "52:54:00:12:34:56", "n": "1e3"}
    value, problems = loaded(dump(original))
    assert problems == []
    assert value == original
