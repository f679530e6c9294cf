"""The workflow ref format shared by the provisioner and the agent.

Each rendered workflow lives on its own ref, ``refs/tinkops/workflows/<id>``. The first commit
contains ``workflow.yaml`` (the rendered, immutable definition) and ``state.json``; every later
commit is one event that rewrites ``state.json`` and the ephemeral data under ``ephemeral/``.
The commit message carries the event as git trailers, so ``git log`` reads as the history.

This module is pure: it parses and formats, and never touches git or the network.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

WORKFLOW_REF_PREFIX = "refs/tinkops/workflows/"
QUEUE_REF_PREFIX = "refs/tinkops/queue/"
STATUS_REF = "refs/tinkops/status"
# The reconciler's status document on STATUS_REF, and its field that tells agents whether the
# provisioner accepts only events signed with the worker's SSH key.
STATUS_FILE = "status.yaml"
SIGNED_EVENTS_FIELD = "require_signed_events"

WORKFLOW_FILE = "workflow.yaml"
STATE_FILE = "state.json"
EPHEMERAL_DIR = "ephemeral"
# Tinkerbell's actions read and write this JSON document, mounted at /workflow/data.
DATA_FILE = "data"

# A workflow id is also a ref name component and a file stem under workflows/.
WORKFLOW_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")

_MAC_SEPARATED = re.compile(r"^[0-9a-fA-F]{1,2}([:-])(?:[0-9a-fA-F]{1,2}\1){4}[0-9a-fA-F]{1,2}$")
_MAC_DOTTED = re.compile(r"^[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}$")
_MAC_BARE = re.compile(r"^[0-9a-fA-F]{12}$")


class State(enum.Enum):
    """The state of a workflow or of one of its actions."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({State.SUCCESS, State.FAILED, State.TIMEOUT, State.CANCELLED})


class ProtocolError(ValueError):
    """A workflow ref contains content that does not follow this format."""


def normalize_mac(text: str) -> str:
    """Return ``text`` as a lower-case, colon-separated MAC address.

    Accepts colons, dashes, Cisco dots and bare hex digits, in any letter case.
    Raises ValueError for anything else.
    """
    value = text.strip()
    if _MAC_SEPARATED.match(value):
        octets = re.split(r"[:-]", value)
        return ":".join(octet.rjust(2, "0").lower() for octet in octets)
    if _MAC_DOTTED.match(value):
        value = value.replace(".", "")
    if _MAC_BARE.match(value):
        value = value.lower()
        return ":".join(value[i : i + 2] for i in range(0, 12, 2))
    raise ValueError(
        f"{text!r} is not a MAC address (expected six hex pairs like 08:00:27:00:00:01)"
    )


def worker_key(worker: str) -> str:
    """Return the ref name component for a worker id (a MAC, or another configured id)."""
    try:
        return normalize_mac(worker).replace(":", "-")
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", worker) or ".." in worker:
        raise ValueError(
            f"worker id {worker!r} is neither a MAC address nor a name made of letters, "
            "digits, '.', '_' and '-'"
        )
    return worker


def canonical_worker(worker: str) -> str:
    """Return the form of a worker id that is compared and stored: MACs lower-case with colons."""
    try:
        return normalize_mac(worker)
    except ValueError:
        return worker


def workflow_ref(workflow_id: str) -> str:
    return WORKFLOW_REF_PREFIX + workflow_id


def queue_prefix(worker: str) -> str:
    return f"{QUEUE_REF_PREFIX}{worker_key(worker)}/"


def queue_ref(worker: str, workflow_id: str) -> str:
    return queue_prefix(worker) + workflow_id


# --- The rendered workflow ------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    name: str
    image: str
    timeout: int = 0
    command: tuple[str, ...] | None = None
    on_timeout: tuple[str, ...] | None = None
    on_failure: tuple[str, ...] | None = None
    volumes: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    pid: str | None = None
    retries: int = 0
    """Extra attempts after a failure (a tinkops extension); all share the action's timeout."""
    reboot: bool = False
    """The action reboots the machine on purpose (a tinkops extension): an agent that restarts
    while it runs records SUCCESS instead of FAILED."""


@dataclass(frozen=True)
class Task:
    name: str
    worker: str
    actions: tuple[Action, ...]
    volumes: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workflow:
    """A rendered workflow: what the agent runs. Never changes once written."""

    id: str
    template: str
    tasks: tuple[Task, ...]
    global_timeout: int = 0
    request: str = ""
    source_commit: str = ""
    created_at: str = ""
    hardware_map: Mapping[str, str] = field(default_factory=dict)

    def flat_actions(self) -> list[tuple[Task, Action]]:
        """Return every action with its task, in the order they run."""
        return [(task, action) for task in self.tasks for action in task.actions]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "template": self.template,
            "request": self.request,
            "source_commit": self.source_commit,
            "created_at": self.created_at,
            "global_timeout": self.global_timeout,
            "hardware_map": dict(self.hardware_map),
            "tasks": [_task_to_dict(task) for task in self.tasks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workflow:
        try:
            return cls(
                id=str(data["id"]),
                template=str(data.get("template", "")),
                request=str(data.get("request", "")),
                source_commit=str(data.get("source_commit", "")),
                created_at=str(data.get("created_at", "")),
                global_timeout=int(data.get("global_timeout") or 0),
                hardware_map={str(k): str(v) for k, v in (data.get("hardware_map") or {}).items()},
                tasks=tuple(_task_from_dict(task) for task in data["tasks"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ProtocolError(f"{WORKFLOW_FILE} is not a rendered workflow: {error}") from error


def _task_to_dict(task: Task) -> dict[str, Any]:
    return {
        "name": task.name,
        "worker": task.worker,
        "volumes": list(task.volumes),
        "environment": dict(task.environment),
        "actions": [_action_to_dict(action) for action in task.actions],
    }


def _action_to_dict(action: Action) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": action.name,
        "image": action.image,
        "timeout": action.timeout,
    }
    if action.command is not None:
        data["command"] = list(action.command)
    if action.on_timeout is not None:
        data["on-timeout"] = list(action.on_timeout)
    if action.on_failure is not None:
        data["on-failure"] = list(action.on_failure)
    data["volumes"] = list(action.volumes)
    data["environment"] = dict(action.environment)
    if action.pid is not None:
        data["pid"] = action.pid
    if action.retries:
        data["retries"] = action.retries
    if action.reboot:
        data["reboot"] = True
    return data


def _task_from_dict(data: Mapping[str, Any]) -> Task:
    return Task(
        name=str(data["name"]),
        worker=str(data["worker"]),
        volumes=tuple(str(v) for v in data.get("volumes") or ()),
        environment={str(k): str(v) for k, v in (data.get("environment") or {}).items()},
        actions=tuple(_action_from_dict(action) for action in data.get("actions") or ()),
    )


def _action_from_dict(data: Mapping[str, Any]) -> Action:
    def strings(key: str) -> tuple[str, ...] | None:
        value = data.get(key)
        return None if value is None else tuple(str(item) for item in value)

    return Action(
        name=str(data["name"]),
        image=str(data["image"]),
        timeout=int(data.get("timeout") or 0),
        command=strings("command"),
        on_timeout=strings("on-timeout"),
        on_failure=strings("on-failure"),
        volumes=tuple(str(v) for v in data.get("volumes") or ()),
        environment={str(k): str(v) for k, v in (data.get("environment") or {}).items()},
        pid=None if data.get("pid") is None else str(data["pid"]),
        retries=int(data.get("retries") or 0),
        reboot=str(data.get("reboot", "")).lower() == "true",
    )


# --- State ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionStatus:
    task: str
    name: str
    worker: str
    state: State = State.PENDING
    started_at: str | None = None
    seconds: int = 0
    message: str = ""
    agent: str = ""
    """The agent instance that started the action (several agents may share a worker id)."""


@dataclass(frozen=True)
class WorkflowStatus:
    """The state of a workflow after its latest event, stored as ``state.json``."""

    workflow: str
    state: State
    actions: tuple[ActionStatus, ...]
    started_at: str | None = None
    updated_at: str | None = None

    @classmethod
    def initial(cls, workflow: Workflow) -> WorkflowStatus:
        actions = tuple(
            ActionStatus(task=task.name, name=action.name, worker=task.worker)
            for task, action in workflow.flat_actions()
        )
        return cls(workflow=workflow.id, state=State.PENDING, actions=actions)

    @property
    def current_index(self) -> int:
        """Return the index of the action in progress, or of the last one once all succeeded."""
        for index, action in enumerate(self.actions):
            if action.state is not State.SUCCESS:
                return index
        return max(len(self.actions) - 1, 0)

    @property
    def progress(self) -> int:
        """Return Tinkerbell's workflow progress in percent (integer division)."""
        total = len(self.actions)
        if total == 0:
            return 0
        done = sum(1 for action in self.actions if action.state is State.SUCCESS)
        return done * 100 // total

    def next_runnable(self) -> int | None:
        """Return the index of the action that runs next, or None once the workflow has ended."""
        if self.state.terminal:
            return None
        for index, action in enumerate(self.actions):
            if action.state is State.SUCCESS:
                continue
            if action.state in (State.PENDING, State.RUNNING):
                return index
            return None
        return None

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = self.state.value
        for action in data["actions"]:
            action["state"] = action["state"].value
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkflowStatus:
        try:
            data = json.loads(text)
            return cls(
                workflow=str(data["workflow"]),
                state=State(data["state"]),
                started_at=data.get("started_at"),
                updated_at=data.get("updated_at"),
                actions=tuple(
                    ActionStatus(
                        task=str(item["task"]),
                        name=str(item["name"]),
                        worker=str(item["worker"]),
                        state=State(item["state"]),
                        started_at=item.get("started_at"),
                        seconds=int(item.get("seconds") or 0),
                        message=str(item.get("message") or ""),
                        agent=str(item.get("agent") or ""),
                    )
                    for item in data["actions"]
                ),
            )
        except (KeyError, TypeError, ValueError, RecursionError) as error:
            raise ProtocolError(f"{STATE_FILE} is not a workflow state: {error}") from error


# --- Events ---------------------------------------------------------------------------------


class EventKind(enum.Enum):
    ACTION = "action"
    """An action changed state; reported by the worker that runs it."""
    WORKFLOW = "workflow"
    """The whole workflow changed state, for example the provisioner enforcing global_timeout."""
    HANDLER = "handler"
    """An on-failure or on-timeout command ran; its outcome does not change the workflow."""


@dataclass(frozen=True)
class Event:
    kind: EventKind
    workflow: str
    workflow_state: State
    worker: str
    message: str
    event_id: str
    created_at: str
    task: str = ""
    action: str = ""
    action_index: int = -1
    action_state: State | None = None
    seconds: int = 0
    log_tail: str = ""
    attempt: int = 0
    """The attempt this event belongs to, for actions with retries (0: not counted)."""

    def subject(self) -> str:
        if self.kind is EventKind.ACTION and self.action_state is not None:
            return f"{self.action_state.value} {self.task}/{self.action} on {self.worker}"
        if self.kind is EventKind.HANDLER:
            return f"HANDLER {self.task}/{self.action} on {self.worker}"
        return f"{self.workflow_state.value} workflow {self.workflow}"


TRAILER_KEYS = (
    ("Tinkops-Event", "kind"),
    ("Workflow", "workflow"),
    ("Workflow-State", "workflow_state"),
    ("Task", "task"),
    ("Action", "action"),
    ("Action-Index", "action_index"),
    ("Action-State", "action_state"),
    ("Worker", "worker"),
    ("Execution-Time", "seconds"),
    ("Attempt", "attempt"),
    ("Created-At", "created_at"),
    ("Event-Id", "event_id"),
)


def format_event_message(event: Event) -> str:
    """Return the commit message for ``event``: subject, message, log tail, trailers."""
    lines = [event.subject(), "", _one_line(event.message) or "(no message)"]
    if event.log_tail:
        lines += ["", "Output (last lines):"]
        lines += ["    " + line for line in event.log_tail.splitlines()]
    values = {
        "kind": event.kind.value,
        "workflow": event.workflow,
        "workflow_state": event.workflow_state.value,
        "task": event.task,
        "action": event.action,
        "action_index": "" if event.action_index < 0 else str(event.action_index),
        "action_state": "" if event.action_state is None else event.action_state.value,
        "worker": event.worker,
        "seconds": str(event.seconds),
        "attempt": str(event.attempt) if event.attempt else "",
        "created_at": event.created_at,
        "event_id": event.event_id,
    }
    lines.append("")
    for trailer, attribute in TRAILER_KEYS:
        value = _one_line(values[attribute])
        if value:
            lines.append(f"{trailer}: {value}")
    return "\n".join(lines) + "\n"


def parse_trailers(message: str) -> dict[str, str]:
    """Return the trailers of a commit message (its last paragraph of ``Key: value`` lines)."""
    message = message.replace("\r\n", "\n")
    paragraphs = [p for p in message.strip().split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        return {}
    trailers: dict[str, str] = {}
    for line in paragraphs[-1].splitlines():
        key, sep, value = line.partition(": ")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key):
            return {}
        trailers[key] = value.strip()
    return trailers


def parse_event_message(message: str) -> Event | None:
    """Return the event a commit message records, or None for a commit that is no event."""
    trailers = parse_trailers(message)
    if "Tinkops-Event" not in trailers:
        return None
    try:
        paragraphs = message.strip().split("\n\n")
        text = paragraphs[1].strip() if len(paragraphs) > 2 else ""
        tail = ""
        for paragraph in paragraphs[2:-1]:
            if paragraph.startswith("Output (last lines):"):
                tail = "\n".join(line[4:] for line in paragraph.splitlines()[1:])
        action_state = trailers.get("Action-State")
        return Event(
            kind=EventKind(trailers["Tinkops-Event"]),
            workflow=trailers["Workflow"],
            workflow_state=State(trailers["Workflow-State"]),
            worker=trailers.get("Worker", ""),
            message=text,
            event_id=trailers.get("Event-Id", ""),
            created_at=trailers.get("Created-At", ""),
            task=trailers.get("Task", ""),
            action=trailers.get("Action", ""),
            action_index=int(trailers.get("Action-Index") or -1),
            action_state=State(action_state) if action_state else None,
            seconds=int(trailers.get("Execution-Time") or 0),
            log_tail=tail,
            attempt=int(trailers.get("Attempt") or 0),
        )
    except (KeyError, ValueError) as error:
        raise ProtocolError(f"event trailers are invalid: {error}") from error


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- Transitions ----------------------------------------------------------------------------


def apply_action_event(
    status: WorkflowStatus,
    index: int,
    state: State,
    *,
    at: str,
    seconds: int = 0,
    message: str = "",
    agent: str | None = None,
) -> WorkflowStatus:
    """Return the status after action ``index`` moved to ``state``.

    A FAILED, TIMEOUT or CANCELLED action ends the workflow in that state; the last action's
    SUCCESS ends it in SUCCESS; anything else leaves the workflow RUNNING.
    """
    if not 0 <= index < len(status.actions):
        raise ProtocolError(f"action index {index} is out of range (0..{len(status.actions) - 1})")
    previous = status.actions[index]
    started_at = at if state is State.RUNNING else previous.started_at
    updated = replace(
        previous,
        state=state,
        started_at=started_at,
        seconds=seconds,
        message=message,
        agent=previous.agent if agent is None else agent,
    )
    actions = (*status.actions[:index], updated, *status.actions[index + 1 :])

    workflow_state: State
    if state in (State.FAILED, State.TIMEOUT, State.CANCELLED):
        workflow_state = state
    elif all(action.state is State.SUCCESS for action in actions):
        workflow_state = State.SUCCESS
    else:
        workflow_state = State.RUNNING
    return replace(
        status,
        state=workflow_state,
        actions=actions,
        started_at=status.started_at or at,
        updated_at=at,
    )


def end_workflow(status: WorkflowStatus, state: State, *, at: str, message: str) -> WorkflowStatus:
    """Return the status after the whole workflow ended in ``state`` (timeout, cancel)."""
    actions = tuple(
        replace(action, state=state, message=message) if action.state is State.RUNNING else action
        for action in status.actions
    )
    return replace(status, state=state, actions=actions, updated_at=at)


def runnable_by(workflow: Workflow, status: WorkflowStatus, worker: str) -> list[int]:
    """Return the indexes of the consecutive actions ``worker`` may run now, in order."""
    start = status.next_runnable()
    if start is None:
        return []
    me = canonical_worker(worker)
    indexes: list[int] = []
    for index in range(start, len(status.actions)):
        if canonical_worker(status.actions[index].worker) != me:
            break
        indexes.append(index)
    return indexes


def workers_of(workflow: Workflow) -> Iterable[str]:
    seen: dict[str, None] = {}
    for task in workflow.tasks:
        seen.setdefault(canonical_worker(task.worker), None)
    return seen.keys()
