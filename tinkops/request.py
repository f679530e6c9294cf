"""Workflow requests: ``workflows/<id>.yaml`` names a template and maps its devices to hardware.

The tinkops shape::

    template: ubuntu
    hardware_map:
      device_1: 08:00:27:00:00:01
    values:
      image_url: http://mirror.local/ubuntu.raw.gz

Tinkerbell's ``Workflow`` custom resource is read too: ``spec.templateRef`` is the template
and ``spec.hardwareMap`` the device map. ``spec.hardwareRef`` is accepted and not needed,
because the device map already names the machines. ``values`` may sit beside ``spec``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tinkops.errors import Problem
from tinkops.schema import RECORD_NAME, RECORD_NAME_RULE, Reader
from tinkops.yamltext import Document, Path_
from tinkops_agent.protocol import WORKFLOW_ID_PATTERN, worker_key

REQUEST_KEYS = ("template", "hardware_map", "values", "cancel")
RESOURCE_KEYS = ("apiVersion", "kind", "metadata", "spec", "status", "values")
RESOURCE_SPEC_KEYS = ("templateRef", "hardwareRef", "hardwareMap", "bootOptions")
# Keys of the device map become template names ({{ device_1 }} or {{.device_1}}).
DEVICE_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


@dataclass(frozen=True)
class WorkflowRequest:
    id: str
    file: str
    template: str
    hardware_map: Mapping[str, str]
    values: Mapping[str, Any] = field(default_factory=dict)
    lines: Mapping[str, int | None] = field(default_factory=dict, compare=False)
    """The line of ``template`` and of each device of the map, for problems found later."""
    cancel: bool = False
    """Set on an already rendered request to ask the provisioner to end its workflow."""


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
    value = document.value
    if isinstance(value, dict) and ("spec" in value or "kind" in value):
        template_path: Path_ = ("spec", "templateRef")
        map_path: Path_ = ("spec", "hardwareMap")
        if not _read_resource(reader):
            return None
    else:
        template_path, map_path = ("template",), ("hardware_map",)
        if reader.mapping((), REQUEST_KEYS, required=("template", "hardware_map")) is None:
            return None

    template = reader.string(template_path) or ""
    if template and not RECORD_NAME.match(template):
        reader.problem(template_path, f"{template!r} is not a template name", RECORD_NAME_RULE)
    hardware_map = reader.string_map(map_path)
    if reader.get(map_path) is not None and not hardware_map:
        reader.problem(
            map_path,
            "the device map is empty",
            "map at least one device, e.g. device_1: 08:00:27:00:00:01",
        )
    _check_devices(reader, map_path, hardware_map)
    values = reader.mapping(("values",), optional=True) or {}
    cancel = bool(reader.boolean(("cancel",)))
    if len(problems) > before:
        return None
    lines = {device: document.line((*map_path, device)) for device in hardware_map}
    lines["template"] = document.line(template_path)
    return WorkflowRequest(
        id=workflow_id,
        file=document.file,
        template=template,
        hardware_map=hardware_map,
        values=values,
        lines=lines,
        cancel=cancel,
    )


def _read_resource(reader: Reader) -> bool:
    if reader.mapping((), RESOURCE_KEYS, required=("spec",)) is None:
        return False
    kind = reader.string(("kind",))
    if kind is not None and kind != "Workflow":
        reader.problem(("kind",), f"kind {kind!r} is not Workflow", "write kind: Workflow")
    spec = reader.mapping(("spec",), RESOURCE_SPEC_KEYS, required=("templateRef", "hardwareMap"))
    return spec is not None


def _check_devices(reader: Reader, path: Path_, hardware_map: Mapping[str, str]) -> None:
    for key, worker in hardware_map.items():
        if not re.match(DEVICE_KEY_PATTERN, key):
            reader.problem(
                (*path, key),
                f"{key!r} cannot be used as a template name",
                "use letters, digits and '_', e.g. device_1",
            )
        try:
            worker_key(worker)
        except ValueError:
            reader.problem(
                (*path, key),
                f"{worker!r} is neither a MAC address nor a worker id",
                "write the machine's MAC, e.g. 08:00:27:00:00:01",
            )
