"""Importing Tinkerbell's hardware documents as records: what ``tinkops hardware push`` commits.

A document is Tinkerbell v0.6's JSON (``tink hardware push``), or a ``Hardware`` custom
resource in JSON or YAML. It is checked as a record would be, its lines pointing into the
document itself, then written as ``hardware/<name>.yaml``. As with Tinkerbell, pushing a
document whose ``id`` a record already has replaces that record. The record keeps its
``agent`` keys unless the document brings its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from tinkops.errors import InvalidContent, Problem
from tinkops.hardware import Hardware, is_resource, parse_hardware
from tinkops.jsontext import load_json
from tinkops.repository import HARDWARE_DIR, Snapshot
from tinkops.schema import RECORD_NAME, RECORD_NAME_RULE
from tinkops.yamltext import dump, load


@dataclass(frozen=True)
class ImportedRecord:
    """A document converted to a record, ready to commit at ``path``."""

    name: str
    path: str
    content: bytes
    record: Hardware
    replaces: str | None
    """The file of the record that had the same id, if any."""


def import_hardware(
    data: bytes, label: str, snapshot: Snapshot, name: str | None = None
) -> ImportedRecord:
    """Convert the document ``data`` (read from ``label``) into a record of ``snapshot``.

    Raise InvalidContent listing every problem: the document's own, a name that cannot be
    a file name, and MACs that another record already owns.
    """
    problems: list[Problem] = []
    is_json = data.lstrip()[:1] == b"{"
    document = load_json(label, data, problems) if is_json else load(label, data, problems)
    if document is None or not isinstance(document.value, dict):
        if not problems:
            problems.append(
                Problem(label, 1, "", "not a hardware document", "write a JSON or YAML object")
            )
        raise InvalidContent(problems)

    previous = _same_id(snapshot, document.value)
    name = name or (previous.name if previous else _derive_name(document.value))
    if not name or not RECORD_NAME.match(name):
        raise InvalidContent(
            [
                Problem(
                    label,
                    None,
                    "",
                    f"{name!r} cannot be the record's file name",
                    f"pass --name: {RECORD_NAME_RULE}",
                )
            ]
        )
    record = parse_hardware(name, document, problems)
    if record is None:
        raise InvalidContent(problems)
    _check_conflicts(record, label, snapshot, problems)
    if problems:
        raise InvalidContent(problems)

    path = f"{HARDWARE_DIR}/{name}.yaml"
    if previous is None and name in snapshot.hardware:
        previous = snapshot.hardware[name]
    content = _record_yaml(data, document.value, is_json, previous)
    _check_written(path, name, content)
    return ImportedRecord(name, path, content, record, previous.file if previous else None)


def _same_id(snapshot: Snapshot, value: Mapping[str, Any]) -> Hardware | None:
    if is_resource(value):
        metadata = value.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        return snapshot.hardware.get(name) if isinstance(name, str) else None
    record_id = value.get("id")
    return next((r for r in snapshot.hardware.values() if r.id and r.id == record_id), None)


def _derive_name(value: Mapping[str, Any]) -> str | None:
    """Return the record name a document implies: its name, hostname, or id."""
    if is_resource(value):
        return _text(value, "metadata", "name")
    hostname = _text(value, "metadata", "instance", "hostname")
    interfaces = _lookup(value, "network", "interfaces")
    if not hostname and isinstance(interfaces, list) and interfaces:
        hostname = _text(interfaces[0], "dhcp", "hostname")
    return (hostname or "").lower() or _text(value, "id")


def _lookup(value: Any, *keys: str) -> Any:
    """Return the value at ``keys``, reading a mapping written as JSON text on the way."""
    for key in keys:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _text(value: Any, *keys: str) -> str | None:
    found = _lookup(value, *keys)
    return found if isinstance(found, str) and found else None


def _check_conflicts(
    record: Hardware, label: str, snapshot: Snapshot, problems: list[Problem]
) -> None:
    for interface in record.interfaces:
        owner = snapshot.workers.get(interface.mac)
        if owner is not None and owner.name != record.name:
            problems.append(
                Problem(
                    label,
                    interface.line,
                    "mac",
                    f"MAC {interface.mac} is already owned by {owner.file}",
                    "each MAC belongs to one record; fix the MAC or remove it from the other",
                )
            )


def _record_yaml(
    data: bytes, value: Mapping[str, Any], is_json: bool, previous: Hardware | None
) -> bytes:
    keep_agent = previous is not None and "agent" not in value and "agent" in previous.raw
    if not is_json:
        text = data.decode("utf-8")
        if keep_agent and previous is not None:
            text = text.rstrip("\n") + "\n" + dump({"agent": previous.raw["agent"]})
        return text.encode()

    document: dict[str, Any] = json.loads(data.decode("utf-8"))
    metadata = document.get("metadata")
    if isinstance(metadata, str) and metadata.strip().startswith("{"):
        # Tinkerbell v0.6 carried metadata as a JSON string. The record stores it as a mapping.
        document["metadata"] = json.loads(metadata)
    if keep_agent and previous is not None:
        document["agent"] = previous.raw["agent"]
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=100)
    return text.encode()


def _check_written(path: str, name: str, content: bytes) -> None:
    """Raise InvalidContent when the YAML written would not read back as a record."""
    problems: list[Problem] = []
    document = load(path, content, problems)
    if document is not None:
        parse_hardware(name, document, problems)
    if problems:
        raise InvalidContent(problems)
