"""What the CLI shows: Tinkerbell's columns, as rows of text built from plain records.

Each ``*_rows`` function returns a header and rows; ``table`` renders them for a terminal and
the CLI's ``--output json|yaml`` prints the same rows as records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.table import Table

from tinkops.hardware import Hardware
from tinkops_agent.eventlog import WorkflowHead
from tinkops_agent.protocol import Event, State


@dataclass(frozen=True)
class Rows:
    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]

    def records(self) -> list[dict[str, str]]:
        keys = [column.lower().replace(" ", "_") for column in self.header]
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


def workflow_rows(heads: Sequence[WorkflowHead], failed: dict[str, list[str]]) -> Rows:
    rows = [
        (
            head.workflow.id,
            head.workflow.template,
            head.status.state.value,
            head.workflow.created_at,
            head.status.updated_at or head.workflow.created_at,
            "",
        )
        for head in heads
    ]
    rows += [
        (workflow_id, "", "NOT RENDERED", "", "", "; ".join(problems))
        for workflow_id, problems in sorted(failed.items())
    ]
    return Rows(("ID", "Template", "State", "Created At", "Updated At", "Error"), rows)


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
