"""The CLI's output: Tinkerbell's columns, as rows of text built from plain records.

Each ``*_rows`` function returns a header and rows; ``table`` renders them for a terminal and
the CLI's ``--output json|yaml`` prints the same rows as records.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich import box
from rich.table import Table

from tinkops.hardware import Hardware, Interface
from tinkops_agent.eventlog import WorkflowHead
from tinkops_agent.protocol import Event, State

# The state ``workflow list`` shows for a request that has no workflow, because it failed
# to render or the provisioner has not reconciled it yet.
NOT_RENDERED = "NOT RENDERED"


@dataclass(frozen=True)
class Rows:
    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    keys: tuple[str, ...] | None = None
    """The record keys for JSON and YAML output (default: the header in snake case)."""

    def records(self) -> list[dict[str, str]]:
        keys = self.keys or tuple(column.lower().replace(" ", "_") for column in self.header)
        return [dict(zip(keys, row, strict=True)) for row in self.rows]


def table(rows: Rows, *, headers: bool = True) -> Table:
    result = Table(box=box.ASCII, show_header=headers, header_style="bold")
    for column in rows.header:
        result.add_column(column, overflow="fold")
    for row in rows.rows:
        result.add_row(*row)
    return result


def action_state_name(state: State) -> str:
    """Return Tinkerbell's enum name for a state, e.g. STATE_RUNNING."""
    return f"STATE_{state.value}"


def state_rows(head: WorkflowHead) -> Rows:
    status = head.status
    index = status.current_index
    current = status.actions[index] if status.actions else None
    return Rows(
        ("Field Name", "Values"),
        [
            ("Workflow ID", head.workflow.id),
            ("Workflow State", status.state.value),
            ("Workflow Progress", f"{status.progress}%"),
            ("Current Task", current.task if current else ""),
            ("Current Action", current.name if current else ""),
            ("Current Worker", current.worker if current else ""),
            ("Current Action State", action_state_name(current.state) if current else ""),
        ],
    )


def events_rows(events: Sequence[Event]) -> Rows:
    return Rows(
        ("Worker ID", "Task Name", "Action Name", "Execution Time", "Message", "Action Status"),
        [
            (
                event.worker,
                event.task,
                event.action,
                str(event.seconds),
                event.message,
                action_state_name(event.action_state)
                if event.action_state
                else event.workflow_state.value,
            )
            for event in events
        ],
    )


def workflow_get_rows(heads: Sequence[WorkflowHead]) -> Rows:
    """Return Tinkerbell's ``workflow get`` columns; the template's id is its name here."""
    rows = [
        (
            head.workflow.id,
            head.workflow.template,
            head.status.state.value,
            head.workflow.created_at,
            head.status.updated_at or head.workflow.created_at,
        )
        for head in heads
    ]
    return Rows(
        ("ID", "Template ID", "State", "Created At", "Updated At"),
        rows,
        keys=("id", "template", "state", "created_at", "updated_at"),
    )


def workflow_list_rows(heads: Sequence[WorkflowHead], failed: dict[str, list[str]]) -> Rows:
    """Return Tinkerbell's ``workflow list`` columns, plus the state and render errors.

    A request that failed to render gets a row in the state NOT RENDERED with its problems.
    """
    rows = [
        (
            head.workflow.id,
            head.workflow.template,
            json.dumps(dict(head.workflow.hardware_map)),
            head.status.state.value,
            head.workflow.created_at,
            head.status.updated_at or head.workflow.created_at,
            "",
        )
        for head in heads
    ]
    rows += [
        (workflow_id, "", "", NOT_RENDERED, "", "", "; ".join(problems))
        for workflow_id, problems in sorted(failed.items())
    ]
    return Rows(
        (
            "Workflow ID",
            "Template ID",
            "Hardware Device",
            "State",
            "Created At",
            "Updated At",
            "Error",
        ),
        rows,
        keys=("id", "template", "hardware", "state", "created_at", "updated_at", "error"),
    )


@dataclass(frozen=True)
class TemplateInfo:
    """A template on the main branch, with the times git history gives its file."""

    id: str
    name: str
    file: str
    created_at: str
    updated_at: str


def template_rows(templates: Sequence[TemplateInfo], *, listing: bool = False) -> Rows:
    """Return Tinkerbell's ``template get`` columns (``template list``'s with ``listing``)."""
    header = (
        ("Template ID", "Template Name", "Created At", "Updated At")
        if listing
        else ("ID", "Name", "Created At", "Updated At")
    )
    rows = [(t.id, t.name, t.created_at, t.updated_at) for t in templates]
    return Rows(header, rows, keys=("id", "name", "created_at", "updated_at"))


@dataclass(frozen=True)
class TimelineEntry:
    """One commit in a workflow's history: its request on main, or its own ref."""

    time: int
    """POSIX seconds (the commit's author time)."""
    author: str
    subject: str
    commit: str
    source: str
    """``main`` for a commit of the request file, ``workflow`` for the workflow ref."""


def timeline_rows(entries: Sequence[TimelineEntry]) -> Rows:
    rows = []
    previous: int | None = None
    for entry in entries:
        since = "" if previous is None else "+" + format_duration(entry.time - previous)
        rows.append(
            (format_time(entry.time), since, entry.author, entry.subject, entry.commit[:12])
        )
        previous = entry.time
    return Rows(
        ("Time", "Since Previous", "Who", "What", "Commit"),
        rows,
        keys=("time", "since_previous", "who", "what", "commit"),
    )


def format_time(posix: int) -> str:
    return datetime.fromtimestamp(posix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: int) -> str:
    """Return ``seconds`` as ``42s``, ``3m05s`` or ``2h07m``; negative values as ``0s``."""
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def hardware_rows(records: Sequence[Hardware]) -> Rows:
    rows = []
    for record in records:
        for interface in record.interfaces:
            rows.append(
                (
                    record.id,
                    interface.mac,
                    interface.ip or "",
                    interface.hostname or "",
                    record.name,
                )
            )
    return Rows(("ID", "MAC Address", "IP Address", "Hostname", "Name"), rows)


def interface_fields(record: Hardware, interface: Interface) -> list[tuple[str, str]]:
    """Return the rows of Tinkerbell's ``hardware mac`` and ``hardware ip`` for one interface."""
    return [
        ("ID", record.id),
        ("MAC Address", interface.mac),
        ("IP Address", interface.ip or ""),
        ("Hostname", interface.hostname or ""),
    ]
