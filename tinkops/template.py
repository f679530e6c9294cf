"""Templates: ``templates/<name>.yaml`` in Tinkerbell's format, and checks of their structure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tinkops.errors import Problem
from tinkops.schema import Reader
from tinkops.yamltext import Document
from tinkops_agent.protocol import Action, Task

TEMPLATE_KEYS = ("version", "name", "id", "global_timeout", "tasks")
TASK_KEYS = ("name", "worker", "volumes", "environment", "actions")
ACTION_KEYS = (
    "name",
    "image",
    "timeout",
    "command",
    "on-timeout",
    "on-failure",
    "volumes",
    "environment",
    "pid",
)
# Tinkerbell accepts names of 1 to 199 bytes.
MAX_NAME_BYTES = 199
# A subset of Docker's reference grammar: lower-case repository path, optional tag or digest.
_IMAGE = re.compile(
    r"^(?:(?:[a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+(?::[0-9]+)?/|localhost(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


@dataclass(frozen=True)
class TemplateSource:
    """A template file as stored on the main branch: its text, rendered per request."""

    name: str
    file: str
    text: str


@dataclass(frozen=True)
class ParsedTemplate:
    name: str
    global_timeout: int
    tasks: tuple[Task, ...]


def parse_rendered(document: Document, problems: list[Problem]) -> ParsedTemplate | None:
    """Validate a rendered template; return its tasks, or None with the problems appended."""
    reader = Reader(document, problems)
    before = len(problems)
    top = reader.mapping((), TEMPLATE_KEYS, required=("name", "tasks"))
    if top is None:
        return None
    name = reader.string(("name",)) or ""
    _check_name(reader, ("name",), name)
    global_timeout = reader.integer(("global_timeout",), minimum=0) or 0

    tasks = []
    task_names: set[str] = set()
    items = reader.sequence(("tasks",), optional=False)
    if not items and "tasks" in top:
        reader.problem(("tasks",), "a template needs at least one task", "add a task")
    for index, _ in enumerate(items):
        task = _parse_task(reader, ("tasks", index))
        if task is None:
            continue
        if task.name in task_names:
            reader.problem(
                ("tasks", index, "name"),
                f"task name {task.name!r} is used twice",
                "give every task of a template its own name",
            )
        task_names.add(task.name)
        tasks.append(task)
    if len(problems) > before:
        return None
    return ParsedTemplate(name=name, global_timeout=global_timeout, tasks=tuple(tasks))


def _parse_task(reader: Reader, path: tuple[str | int, ...]) -> Task | None:
    if reader.mapping(path, TASK_KEYS, required=("name", "worker", "actions")) is None:
        return None
    name = reader.string((*path, "name")) or ""
    _check_name(reader, (*path, "name"), name)
    worker = reader.string((*path, "worker")) or ""
    if not worker.strip() and reader.get((*path, "worker")) is not None:
        reader.problem(
            (*path, "worker"),
            "worker is empty after rendering",
            "map the placeholder to a hardware MAC in the request",
        )
    volumes = reader.string_list((*path, "volumes")) or ()
    _check_volumes(reader, (*path, "volumes"), volumes)
    environment = reader.string_map((*path, "environment"))

    actions = []
    action_names: set[str] = set()
    for index, _ in enumerate(reader.sequence((*path, "actions"))):
        action = _parse_action(reader, (*path, "actions", index))
        if action is None:
            continue
        if action.name in action_names:
            reader.problem(
                (*path, "actions", index, "name"),
                f"action name {action.name!r} is used twice in task {name!r}",
                "give every action of a task its own name",
            )
        action_names.add(action.name)
        actions.append(action)
    return Task(
        name=name,
        worker=worker.strip(),
        actions=tuple(actions),
        volumes=volumes,
        environment=environment,
    )


def _parse_action(reader: Reader, path: tuple[str | int, ...]) -> Action | None:
    if reader.mapping(path, ACTION_KEYS, required=("name", "image")) is None:
        return None
    name = reader.string((*path, "name")) or ""
    _check_name(reader, (*path, "name"), name)
    image = reader.string((*path, "image")) or ""
    if image and not _IMAGE.match(image):
        reader.problem(
            (*path, "image"),
            f"{image!r} is not a valid image reference",
            "use a lower-case name with an optional registry, tag or digest, "
            "e.g. quay.io/tinkerbell/actions/image2disk:latest",
        )
    volumes = reader.string_list((*path, "volumes")) or ()
    _check_volumes(reader, (*path, "volumes"), volumes)
    pid = reader.string((*path, "pid"))
    return Action(
        name=name,
        image=image,
        timeout=reader.integer((*path, "timeout"), minimum=0) or 0,
        command=reader.string_list((*path, "command")),
        on_timeout=reader.string_list((*path, "on-timeout")),
        on_failure=reader.string_list((*path, "on-failure")),
        volumes=volumes,
        environment=reader.string_map((*path, "environment")),
        pid=pid,
    )


def _check_name(reader: Reader, path: tuple[str | int, ...], name: str) -> None:
    if not name and reader.get(path) is not None:
        reader.problem(path, "name is empty", "write a name of 1 to 199 bytes")
    elif len(name.encode()) > MAX_NAME_BYTES:
        reader.problem(
            path,
            f"name is {len(name.encode())} bytes long",
            f"shorten it to at most {MAX_NAME_BYTES} bytes",
        )


def _check_volumes(reader: Reader, path: tuple[str | int, ...], volumes: tuple[str, ...]) -> None:
    targets: dict[str, int] = {}
    for index, volume in enumerate(volumes):
        parts = volume.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
            reader.problem(
                (*path, index),
                f"{volume!r} is not a volume",
                "write SOURCE:/TARGET[:OPTIONS], e.g. /dev:/dev",
            )
            continue
        if parts[1] in targets:
            reader.problem(
                (*path, index),
                f"two volumes mount onto {parts[1]}",
                "keep one volume per target",
            )
        targets[parts[1]] = index
