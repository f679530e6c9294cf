"""The seam between the agent and whatever runs an action: the container spec and its result.

``build_spec`` turns a task and one of its actions into a ``ContainerSpec`` with Tinkerbell's
merge rules. A ``Runtime`` (Docker for real workers, plain processes for development) runs
that spec and returns a ``RunResult``. Nothing here talks to Docker or starts a process.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tinkops_agent.protocol import Action, State, Task

WORKFLOW_MOUNT = "/workflow"
"""Container path of the workflow's ephemeral data directory in every action."""

LABEL_MANAGED = "tinkops.managed"
LABEL_WORKFLOW = "tinkops.workflow"
LABEL_WORKER = "tinkops.worker"
LABEL_TASK = "tinkops.task"
LABEL_ACTION = "tinkops.action"
LABEL_ACTION_INDEX = "tinkops.action-index"
LABEL_AGENT = "tinkops.agent"
"""The agent instance that started the container, so cleanup removes only its own."""

LOG_TAIL_MAX_LINES = 50
LOG_TAIL_MAX_BYTES = 8192

# Docker's own rule for container names, and its length limit in practice.
CONTAINER_NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
CONTAINER_NAME_MAX_LENGTH = 128

_UNSAFE_NAME_CHARACTERS = re.compile(r"[^a-zA-Z0-9_.-]+")
_SLUG_MAX_LENGTH = 40
_WORKFLOW_SLUG_MAX_LENGTH = 63
_NAME_HASH_LENGTH = 10


class ContainerRuntimeError(RuntimeError):
    """The runtime itself failed, so the outcome of the action it was running is unknown.

    Raised for an unreachable engine or an engine error while a container ran. Failures
    caused by the action (a missing image, a rejected volume, a command that does not
    exist) come back as a FAILED ``RunResult`` instead.
    """


class ActionSpecError(ValueError):
    """An action's settings cannot be turned into a container (volume, environment)."""


class DuplicateVolumeTargetError(ActionSpecError):
    """Two volumes of one list (a task's or an action's) are mounted at the same target."""

    def __init__(self, owner: str, target: str, volumes: Sequence[str]) -> None:
        self.owner = owner
        self.target = target
        self.volumes = tuple(volumes)
        listed = ", ".join(repr(volume) for volume in volumes)
        super().__init__(
            f"{owner} mounts two volumes at {target} ({listed}); keep one volume per container path"
        )


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a runtime needs to run one action."""

    name: str
    """Docker-safe container name, unique per workflow, action and worker directory."""
    image: str
    command: tuple[str, ...] | None
    """The container's Cmd, or None to keep the image's. The entrypoint is never replaced."""
    environment: Mapping[str, str]
    volumes: tuple[str, ...]
    """Docker binds ``src:dst[:opts]``, the ``/workflow`` bind first."""
    pid: str | None
    workflow_dir: Path
    """Host directory mounted at ``/workflow``."""
    timeout: float | None
    """Seconds the action may run; None means no limit."""
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not CONTAINER_NAME_PATTERN.fullmatch(self.name):
            raise ValueError(
                f"container name {self.name!r} is invalid (expected [a-zA-Z0-9][a-zA-Z0-9_.-]*)"
            )
        if len(self.name) > CONTAINER_NAME_MAX_LENGTH:
            raise ValueError(
                f"container name {self.name!r} is longer than "
                f"{CONTAINER_NAME_MAX_LENGTH} characters"
            )
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, not {self.timeout!r}")


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run of an action."""

    state: State
    """SUCCESS, FAILED, TIMEOUT or CANCELLED."""
    exit_code: int | None
    """The command's exit status; None when it never started or no status was reported."""
    seconds: float
    message: str
    log_tail: str
    """The last lines of the output, bounded by ``tail_lines``."""
    log_path: Path
    """The full output, kept on the worker."""
    notes: tuple[str, ...] = ()
    """Facts the caller records in the event, such as a privilege fallback."""


class Runtime(Protocol):
    """Something that runs an action described by a ``ContainerSpec``."""

    def run(
        self, spec: ContainerSpec, log_path: Path, cancel: threading.Event | None = None
    ) -> RunResult:
        """Run ``spec`` to its end, writing its whole output to ``log_path``.

        Setting ``cancel`` stops the action and returns CANCELLED. Returns FAILED when the
        action cannot start. Raises ContainerRuntimeError when the runtime itself fails.
        """
        ...

    def cleanup(self, labels: Mapping[str, str]) -> int:
        """Remove what crashed runs left that carries all ``labels`` and return the count."""
        ...

    def describe(self) -> str:
        """Return one line saying what runs actions and how, for logs and events."""
        ...


def build_spec(
    workflow_id: str,
    index: int,
    task: Task,
    action: Action,
    workflow_dir: Path,
    default_timeout: float | None,
) -> ContainerSpec:
    """Merge ``task`` and ``action`` into the spec of action number ``index`` of a workflow.

    The environment is the task's with the action's on top, values kept as written. Volumes
    are the task's then the action's, and an action volume replaces a task volume mounted
    at the same container path. ``workflow_dir`` is always bound at ``/workflow``.

    Raises ActionSpecError for a malformed volume or environment name, and its subclass
    DuplicateVolumeTargetError when one list mounts two volumes at one path.
    """
    # Docker reads a relative bind source as a volume name, so the path is made absolute.
    workflow_dir = workflow_dir.absolute()
    if ":" in str(workflow_dir):
        raise ValueError(
            f"workflow directory {str(workflow_dir)!r} contains ':', "
            "which cannot appear in a Docker bind; choose a path without it"
        )
    if default_timeout is not None and default_timeout <= 0:
        raise ValueError(f"default_timeout must be positive or None, not {default_timeout!r}")

    # Tinkerbell's workers read a timeout of 0 as a deadline that has already passed, or
    # as one hour. Here 0 or a missing value means the action has no limit of its own, so
    # the agent's configured default applies (None: no limit at all).
    timeout = float(action.timeout) if action.timeout > 0 else default_timeout

    return ContainerSpec(
        name=container_name(workflow_id, index, action.name, workflow_dir),
        image=action.image,
        command=action.command,
        environment=merge_environment(task, action),
        volumes=merge_volumes(task, action, workflow_dir),
        pid=action.pid or None,
        workflow_dir=workflow_dir,
        timeout=timeout,
        labels={
            LABEL_MANAGED: "true",
            LABEL_WORKFLOW: workflow_id,
            LABEL_WORKER: task.worker,
            LABEL_TASK: task.name,
            LABEL_ACTION: action.name,
            LABEL_ACTION_INDEX: str(index),
        },
    )


def merge_environment(task: Task, action: Action) -> dict[str, str]:
    """Return the task's environment updated by the action's; values stay as written."""
    merged: dict[str, str] = {}
    for owner, environment in (
        (f"task {task.name!r}", task.environment),
        (f"action {action.name!r}", action.environment),
    ):
        for key, value in environment.items():
            _validate_environment_entry(owner, key, value)
            merged[key] = value
    return merged


def merge_volumes(task: Task, action: Action, workflow_dir: Path) -> tuple[str, ...]:
    """Return the ``/workflow`` bind, the task's volumes not replaced, then the action's."""
    task_targets = _targets_of(f"task {task.name!r}", task.volumes)
    action_targets = _targets_of(f"action {action.name!r}", action.volumes)

    merged = [f"{workflow_dir}:{WORKFLOW_MOUNT}"]
    merged += [
        volume
        for volume, target in zip(task.volumes, task_targets, strict=True)
        if target not in action_targets
    ]
    merged += action.volumes
    return tuple(merged)


def volume_target(volume: str) -> str:
    """Return the normalised container path of a ``src:dst[:opts]`` or ``dst`` volume.

    Raises ActionSpecError when the volume has more than three parts, an empty part or a
    target that is not an absolute path.
    """
    parts = volume.split(":")
    if len(parts) > 3 or any(not part for part in parts):
        raise ActionSpecError(
            f"volume {volume!r} is invalid (expected 'source:target' or 'source:target:options')"
        )
    target = parts[0] if len(parts) == 1 else parts[1]
    if not target.startswith("/"):
        raise ActionSpecError(
            f"volume {volume!r} is invalid: the target {target!r} must be an absolute path"
        )
    return posixpath.normpath(target)


def _targets_of(owner: str, volumes: Sequence[str]) -> list[str]:
    targets: list[str] = []
    for volume in volumes:
        target = volume_target(volume)
        if target == WORKFLOW_MOUNT:
            raise ActionSpecError(
                f"{owner} mounts volume {volume!r} at {WORKFLOW_MOUNT}, which is reserved "
                "for the workflow's ephemeral data; choose another container path"
            )
        if target in targets:
            first = volumes[targets.index(target)]
            raise DuplicateVolumeTargetError(owner, target, (first, volume))
        targets.append(target)
    return targets


def _validate_environment_entry(owner: str, key: str, value: str) -> None:
    if not key or "=" in key or "\0" in key:
        raise ActionSpecError(
            f"{owner} has an invalid environment variable name {key!r} "
            "(it must be non-empty and contain neither '=' nor NUL)"
        )
    if "\0" in value:
        raise ActionSpecError(f"{owner} sets environment variable {key} to a value with NUL")


def container_name(workflow_id: str, index: int, action_name: str, workflow_dir: Path) -> str:
    """Return ``tinkops-<workflow>-<index>-<action slug>-<hash>``, safe for Docker.

    The slug keeps the readable ASCII part of the action name. The hash covers the exact
    workflow id, index, action name and workflow directory, so two actions never share a
    name even when their slugs are equal, and neither do two agents on one engine.
    """
    identity = "\0".join((workflow_id, str(index), action_name, str(workflow_dir)))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:_NAME_HASH_LENGTH]
    workflow_slug = _slug(workflow_id, _WORKFLOW_SLUG_MAX_LENGTH) or "workflow"
    action_slug = _slug(action_name, _SLUG_MAX_LENGTH) or "action"
    return f"tinkops-{workflow_slug}-{index}-{action_slug}-{digest}"


def _slug(text: str, max_length: int) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = _UNSAFE_NAME_CHARACTERS.sub("-", ascii_text).strip("-._")
    return slug[:max_length].rstrip("-._")


def tail_lines(
    text: str, max_lines: int = LOG_TAIL_MAX_LINES, max_bytes: int = LOG_TAIL_MAX_BYTES
) -> str:
    """Return the last lines of ``text``: at most ``max_lines`` lines and ``max_bytes`` bytes.

    Whole lines are kept. Only when the last line alone exceeds ``max_bytes`` is it cut,
    keeping its end.
    """
    lines = text.splitlines()[-max_lines:] if max_lines > 0 else []
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        line_size = len(line.encode()) + (1 if kept else 0)
        if size + line_size > max_bytes:
            if not kept:
                kept.append(_utf8_suffix(line, max_bytes))
            break
        kept.append(line)
        size += line_size
    return "\n".join(reversed(kept))


def _utf8_suffix(text: str, max_bytes: int) -> str:
    encoded = text.encode()[-max_bytes:] if max_bytes > 0 else b""
    # The cut may split a multi-byte character, so its orphaned bytes are dropped.
    return encoded.decode(errors="ignore")


def read_log_tail(
    log_path: Path, max_lines: int = LOG_TAIL_MAX_LINES, max_bytes: int = LOG_TAIL_MAX_BYTES
) -> str:
    """Return ``tail_lines`` of the end of the log at ``log_path``, or "" if it is missing."""
    try:
        with log_path.open("rb") as log:
            size = log.seek(0, 2)
            # Read twice the byte budget so that the first kept line is a whole line.
            log.seek(max(0, size - 2 * max_bytes))
            data = log.read()
    except FileNotFoundError:
        return ""
    return tail_lines(data.decode(errors="replace"), max_lines, max_bytes)
