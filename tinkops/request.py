"""Workflow requests: ``workflows/<id>.yaml`` names a template and maps its devices to hardware."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tinkops.errors import Problem
from tinkops.schema import Reader
from tinkops.yamltext import Document
from tinkops_agent.protocol import WORKFLOW_ID_PATTERN

REQUEST_KEYS = ("template", "hardware_map", "values")
# Keys of the device map become template names ({{ device_1 }} or {{.device_1}}).
DEVICE_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


@dataclass(frozen=True)
class WorkflowRequest:
    id: str
    file: str
    template: str
    hardware_map: Mapping[str, str]
    values: Mapping[str, Any] = field(default_factory=dict)


def valid_workflow_id(name: str) -> bool:
    return bool(WORKFLOW_ID_PATTERN.match(name))


def parse_request(
    workflow_id: str, document: Document, problems: list[Problem]
) -> WorkflowRequest | None:
    """Validate a request; return it, or None with the problems appended."""
    reader = Reader(document, problems)
    before = len(problems)
    if not valid_workflow_id(workflow_id):
        reader.problem(
            (),
            f"file name {workflow_id!r} is not a valid workflow id",
            "use lower-case letters, digits, '.', '_' and '-' (at most 63), "
            "starting and ending with a letter or digit",
        )
    if reader.mapping((), REQUEST_KEYS, required=("template", "hardware_map")) is None:
        return None
    template = reader.string(("template",)) or ""
    hardware_map = reader.string_map(("hardware_map",))
    if "hardware_map" in (reader.get(()) or {}) and not hardware_map:
        reader.problem(
            ("hardware_map",),
            "the device map is empty",
            "map at least one device, e.g. device_1: 08:00:27:00:00:01",
        )
    for key in hardware_map:
        if not re.match(DEVICE_KEY_PATTERN, key):
            reader.problem(
                ("hardware_map", key),
                f"{key!r} cannot be used as a template name",
                "use letters, digits and '_', e.g. device_1",
            )
    values = reader.mapping(("values",), optional=True) or {}
    if len(problems) > before:
        return None
    return WorkflowRequest(
        id=workflow_id,
        file=document.file,
        template=template,
        hardware_map=hardware_map,
        values=values,
    )
