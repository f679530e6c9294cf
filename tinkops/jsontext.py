"""JSON documents read the way YAML files are: every scalar as text, values with their lines.

Tinkerbell's hardware documents are JSON. JSON is almost a subset of YAML, so a document is
read by the YAML loader first, which records the line of each value. Only JSON that YAML
cannot read is read by the JSON parser, and its values then have no line numbers.
"""

from __future__ import annotations

import json
from typing import Any

from tinkops.errors import Problem
from tinkops.yamltext import MAX_DEPTH, Document, load


def load_json(file: str, data: bytes, problems: list[Problem]) -> Document | None:
    """Parse a JSON document, read as YAML first so that values keep their lines.

    JSON that YAML cannot read (a tab used as indentation) is read by the JSON parser
    instead; its values then have no line numbers.
    """
    found: list[Problem] = []
    document = load(file, data, found)
    if document is not None or not any("invalid YAML" in p.message for p in found):
        problems.extend(found)
        return document
    try:
        value = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as error:
        problems.append(
            Problem(file, error.lineno, "", f"invalid JSON: {error.msg}", "fix the syntax")
        )
        return None
    except RecursionError:
        problems.append(
            Problem(file, None, "", "JSON is nested too deeply", f"keep under {MAX_DEPTH} levels")
        )
        return None
    return Document(file, json_as_text(value))


def json_as_text(value: Any) -> Any:
    """Return JSON-decoded ``value`` with every scalar as text, as YAML files are read."""
    if isinstance(value, dict):
        return {str(key): json_as_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_as_text(item) for item in value]
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)
