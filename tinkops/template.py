"""Templates: ``templates/<name>.yaml`` in Tinkerbell's format, and checks of their structure.

A template is checked twice. On its own (``check_template``), it is rendered with a stand-in
for every name, so its own mistakes are reported with its own file and line even before a
request uses it. For each request (tinkops/planner.py), the rendered text is checked again
with ``parse_rendered``, which returns the tasks the workflow runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from tinkops.errors import Problem, RenderError
from tinkops.render import render_placeholders
from tinkops.schema import Reader
from tinkops.yamltext import Document, Path_, load
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
    # tinkops extensions: extra attempts after a failure, and "this action reboots".
    "retries",
    "reboot",
)
# Extra attempts are bounded so one action cannot loop for hours within a long timeout.
MAX_RETRIES = 10
# Tinkerbell accepts names of 1 to 199 bytes. Tinkerbell v0.6 also limited a template's
# name to these characters, because its database column had this check.
MAX_NAME_BYTES = 199
TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PID_MODES = ("", "host", "private")
VOLUME_OPTIONS = frozenset(
    {"ro", "rw", "z", "Z", "shared", "rshared", "slave", "rslave", "private", "rprivate"}
    | {"nocopy", "consistent", "cached", "delegated"}
)
_RESOURCE_KIND = re.compile(r"^kind:\s*Template\s*$", re.MULTILINE)
_NAMED_VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Docker's reference grammar (distribution/reference), piece by piece.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_DIGEST_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
MAX_IMAGE_NAME = 255


@dataclass(frozen=True)
class TemplateSource:
    """A template file as stored on the main branch: its text, rendered per request."""

    name: str
    file: str
    text: str
    declared_name: str | None = None
    line_offset: int = 0
    """The file line before the text's first line (a ``Template`` resource's ``spec.data``)."""

    def file_line(self, line: int | None) -> int | None:
        """Return the line of ``file`` that line ``line`` of ``text`` is on."""
        return None if line is None else line + self.line_offset


def read_template(
    name: str, file: str, content: str, problems: list[Problem]
) -> TemplateSource | None:
    """Return the template a file contains, checked on its own.

    A file is the template itself, or Tinkerbell's ``Template`` custom resource, whose
    ``spec.data`` is the template written as a literal block (``data: |``).
    """
    if not _RESOURCE_KIND.search(content):
        return check_template(TemplateSource(name, file, content), problems)
    document = load(file, content.encode(), problems)
    if document is None:
        return None
    reader = Reader(document, problems)
    before = len(problems)
    reader.mapping((), ("apiVersion", "kind", "metadata", "spec", "status"), required=("spec",))
    reader.mapping(("spec",), ("data",), required=("data",))
    data = reader.string(("spec", "data"))
    if data is None or len(problems) > before:
        return None
    offset = document.line(("spec", "data")) or 0
    return check_template(TemplateSource(name, file, data, line_offset=offset), problems)


@dataclass(frozen=True)
class ParsedTemplate:
    name: str
    global_timeout: int
    tasks: tuple[Task, ...]


def check_template(source: TemplateSource, problems: list[Problem]) -> TemplateSource:
    """Check a template on its own; return it with its declared name when it has one."""
    try:
        text = render_placeholders(source.text)
    except RenderError as error:
        problems.append(
            Problem(
                source.file,
                source.file_line(error.line),
                "",
                error.message,
                error.fix or "fix the template",
            )
        )
        return source

    found: list[Problem] = []
    document = load(source.file, text.encode(), found)
    parsed = parse_rendered(document, found) if document is not None else None
    to_source = line_map(source.text, text)
    problems.extend(dataclasses.replace(p, line=source.file_line(to_source(p.line))) for p in found)
    declared = parsed.name if parsed is not None else None
    if declared is None and document is not None and isinstance(document.value, dict):
        name = document.value.get("name")
        declared = name if isinstance(name, str) else None
    return dataclasses.replace(source, declared_name=declared)


def line_map(source: str, rendered: str) -> Callable[[int | None], int | None]:
    """Return a function from lines of ``rendered`` to the lines of ``source`` they came from.

    Rendering keeps most lines as they are, because a translated Go action keeps its
    newlines. The two texts are aligned line by line, and a line that a placeholder changed
    maps to the source line in the same place of its changed block.
    """
    source_lines = source.splitlines()
    rendered_lines = rendered.splitlines()
    if len(source_lines) == len(rendered_lines):
        return lambda line: line
    mapping: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, source_lines, rendered_lines, autojunk=False)
    for _tag, start, end, rendered_start, rendered_end in matcher.get_opcodes():
        for offset in range(rendered_end - rendered_start):
            mapping[rendered_start + offset + 1] = min(start + offset, max(end - 1, start)) + 1
    return lambda line: None if line is None else mapping.get(line, line)


def parse_rendered(document: Document, problems: list[Problem]) -> ParsedTemplate | None:
    """Validate a rendered template; return its tasks, or None with the problems appended."""
    reader = Reader(document, problems)
    before = len(problems)
    if document.value is None:
        reader.problem((), "the template is empty", "write version, name and tasks")
        return None
    top = reader.mapping((), TEMPLATE_KEYS, required=("name", "tasks"))
    if top is None:
        return None
    name = reader.string(("name",)) or ""
    _check_name(reader, ("name",), name)
    if name and not TEMPLATE_NAME.match(name):
        reader.problem(
            ("name",),
            f"template name {name!r} contains characters other than letters, digits, '_', '-'",
            "rename it, e.g. ubuntu-22-04",
        )
    reader.string(("version",))
    reader.string(("id",))
    global_timeout = reader.integer(("global_timeout",), minimum=0) or 0

    tasks = []
    task_names: set[str] = set()
    items = reader.sequence(("tasks",), optional=False)
    if not items and isinstance(top.get("tasks"), list):
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


def _parse_task(reader: Reader, path: Path_) -> Task | None:
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
    _check_environment(reader, (*path, "environment"), environment)

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


def _parse_action(reader: Reader, path: Path_) -> Action | None:
    if reader.mapping(path, ACTION_KEYS, required=("name", "image")) is None:
        return None
    name = reader.string((*path, "name")) or ""
    _check_name(reader, (*path, "name"), name)
    image = _parse_image(reader, (*path, "image"))

    volumes = reader.string_list((*path, "volumes")) or ()
    _check_volumes(reader, (*path, "volumes"), volumes)
    environment = reader.string_map((*path, "environment"))
    _check_environment(reader, (*path, "environment"), environment)

    pid = reader.string((*path, "pid"))
    if pid is not None and pid not in PID_MODES and not pid.startswith("container:"):
        reader.problem(
            (*path, "pid"),
            f"{pid!r} is not a PID namespace mode",
            "write host (needed by kexec and reboot), or leave it out",
        )
    return Action(
        name=name,
        image=image,
        timeout=reader.integer((*path, "timeout"), minimum=0) or 0,
        command=reader.string_list((*path, "command")),
        on_timeout=reader.string_list((*path, "on-timeout")),
        on_failure=reader.string_list((*path, "on-failure")),
        volumes=volumes,
        environment=environment,
        pid=pid,
        retries=reader.integer((*path, "retries"), minimum=0, maximum=MAX_RETRIES) or 0,
        reboot=bool(reader.boolean((*path, "reboot"))),
    )


def _parse_image(reader: Reader, path: Path_) -> str:
    image = reader.string(path) or ""
    reason = image_problem(image) if image else None
    if reason is not None:
        reader.problem(
            path,
            f"{image!r} is not a valid image reference: {reason}",
            "use a lower-case name with an optional registry, tag or digest, "
            "e.g. quay.io/tinkerbell/actions/image2disk:latest",
        )
    return image


def image_problem(image: str) -> str | None:
    """Return why ``image`` is not a valid Docker image reference, or None when it is.

    Follows Docker's ``ParseNormalizedNamed``: an optional registry (recognised by a '.',
    a ':' or ``localhost`` in the first component), a lower-case repository path, then an
    optional tag and an optional digest.
    """
    rest, _, digest = image.partition("@")
    if digest:
        algorithm, _, hexadecimal = digest.partition(":")
        expected = _DIGEST_LENGTHS.get(algorithm)
        if not _DIGEST.match(digest) or (expected and len(hexadecimal) != expected):
            return f"digest {digest!r} is invalid"
    name, tag = rest, ""
    if ":" in rest.rpartition("/")[2]:
        name, _, tag = rest.rpartition(":")
        if not _TAG.match(tag):
            return f"tag {tag!r} is invalid (letters, digits, '_', '.', '-'; at most 128)"
    if not name:
        return "the repository name is missing"
    if len(name) > MAX_IMAGE_NAME:
        return f"the repository name is longer than {MAX_IMAGE_NAME} characters"
    components = name.split("/")
    first = components[0]
    # Docker reads the first component as a registry when it has a '.' or a ':', is
    # localhost, or has an upper-case letter.
    is_registry = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if len(components) > 1 and is_registry:
        if not _DOMAIN.match(first):
            return f"registry {first!r} is invalid"
        components = components[1:]
    for component in components:
        if component != component.lower():
            return "the repository name must be lower-case"
        if not _PATH_COMPONENT.match(component):
            return f"path component {component!r} is invalid"
    if re.fullmatch(r"[a-f0-9]{64}", "/".join(components)):
        return "a 64-digit hexadecimal repository name is an image id, not a name"
    return None


def _check_name(reader: Reader, path: Path_, name: str) -> None:
    if not name and reader.get(path) is not None:
        reader.problem(path, "name is empty", "write a name of 1 to 199 bytes")
    elif len(name.encode()) > MAX_NAME_BYTES:
        reader.problem(
            path,
            f"name is {len(name.encode())} bytes long",
            f"shorten it to at most {MAX_NAME_BYTES} bytes",
        )
    elif _CONTROL.search(name):
        reader.problem(path, f"name {name!r} contains a control character", "keep it one line")


def _check_environment(reader: Reader, path: Path_, environment: dict[str, str]) -> None:
    for key in environment:
        if not key or "=" in key or _CONTROL.search(key):
            reader.problem(
                (*path, key),
                f"{key!r} is not an environment variable name",
                "use letters, digits and '_', e.g. DEST_DISK",
            )


def _check_volumes(reader: Reader, path: Path_, volumes: tuple[str, ...]) -> None:
    targets: dict[str, int] = {}
    for index, volume in enumerate(volumes):
        reason = _volume_problem(volume)
        if reason is not None:
            reader.problem(
                (*path, index),
                f"{volume!r} is not a volume: {reason}",
                "write SOURCE:/TARGET[:OPTIONS], e.g. /dev:/dev or /lib/firmware:/lib/firmware:ro",
            )
            continue
        target = volume.split(":")[1].rstrip("/") or "/"
        if target in targets:
            reader.problem(
                (*path, index),
                f"two volumes mount onto {target} (items {targets[target]} and {index})",
                "keep one volume per target; an action's volume already replaces the task's",
            )
        targets[target] = index


def _volume_problem(volume: str) -> str | None:
    parts = volume.split(":")
    if len(parts) not in (2, 3):
        return "expected two or three ':'-separated parts"
    source, target = parts[0], parts[1]
    if not source.startswith("/") and not _NAMED_VOLUME.match(source):
        return f"source {source!r} is neither an absolute path nor a volume name"
    if not target.startswith("/"):
        return f"target {target!r} is not an absolute path"
    if len(parts) == 3:
        unknown = [option for option in parts[2].split(",") if option not in VOLUME_OPTIONS]
        if unknown:
            return f"unknown option {unknown[0]!r}"
    return None
