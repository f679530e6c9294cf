"""Supervising workflows that are still queued: what the provisioner enforces by itself.

A pass looks only at workflows that still have queue refs, so its cost follows the number of
active workflows. It ends a workflow whose global_timeout has passed when no agent recorded
that (the agent may be dead), ends workflows whose request asks for a cancel, and removes
the queue refs of finished workflows so workers stop fetching them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from tinkops.workflows import RECONCILER
from tinkops_agent.eventlog import WorkflowHead, append_event, new_event_id, parse_time, utc_now
from tinkops_agent.eventlog import read_head as read_workflow_head
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import (
    QUEUE_REF_PREFIX,
    STATE_FILE,
    Event,
    EventKind,
    ProtocolError,
    State,
    WorkflowStatus,
    end_workflow,
    workflow_ref,
)

log = logging.getLogger(__name__)

# Agents enforce global_timeout themselves; the provisioner steps in this many seconds later,
# which also absorbs clock differences between the two machines.
DEFAULT_GRACE = 10.0


@dataclass
class SupervisionResult:
    ended: dict[str, State] = field(default_factory=dict)
    unqueued: list[str] = field(default_factory=list)
    next_deadline: float | None = None
    """POSIX time of the next global timeout to enforce, if any."""


def supervise(
    repo: GitRepo,
    *,
    cancelled: Collection[str] = (),
    grace: float = DEFAULT_GRACE,
    now: float | None = None,
) -> SupervisionResult:
    """Run one supervision pass over the queued workflows of ``repo``."""
    now = time.time() if now is None else now
    result = SupervisionResult()
    queued: dict[str, dict[str, str]] = {}
    for ref, sha in repo.refs(QUEUE_REF_PREFIX).items():
        workflow_id = ref.rsplit("/", 1)[1]
        queued.setdefault(workflow_id, {})[ref] = sha
    if not queued:
        return result

    refs = [workflow_ref(workflow_id) for workflow_id in queued]
    tips = repo.resolve(refs)
    states = repo.read_objects([f"{tip}:{STATE_FILE}" for tip in tips.values() if tip])
    for workflow_id, queue_refs in sorted(queued.items()):
        tip = tips[workflow_ref(workflow_id)]
        raw = states.get(f"{tip}:{STATE_FILE}") if tip else None
        if tip is None or raw is None:
            _unqueue(repo, queue_refs)
            result.unqueued.append(workflow_id)
            continue
        try:
            status = WorkflowStatus.from_json(raw)
        except ProtocolError as error:
            log.error("workflow %s state unreadable at %s: %s", workflow_id, tip[:12], error)
            continue
        if status.state.terminal:
            _unqueue(repo, queue_refs)
            result.unqueued.append(workflow_id)
            continue
        _supervise_active(repo, workflow_id, tip, status, cancelled, grace, now, result)
    return result


def _supervise_active(
    repo: GitRepo,
    workflow_id: str,
    tip: str,
    status: WorkflowStatus,
    cancelled: Collection[str],
    grace: float,
    now: float,
    result: SupervisionResult,
) -> None:
    if workflow_id in cancelled:
        head = read_workflow_head(repo, tip)
        if _end(repo, head, State.CANCELLED, "cancelled by request"):
            result.ended[workflow_id] = State.CANCELLED
        return
    if status.state is not State.RUNNING or not status.started_at:
        return
    head = read_workflow_head(repo, tip)
    limit = head.workflow.global_timeout
    if limit <= 0:
        return
    deadline = parse_time(status.started_at) + limit + grace
    if now < deadline:
        if result.next_deadline is None or deadline < result.next_deadline:
            result.next_deadline = deadline
        return
    message = f"global_timeout of {limit} s exceeded; recorded by the provisioner"
    if _end(repo, head, State.TIMEOUT, message):
        result.ended[workflow_id] = State.TIMEOUT


def _end(repo: GitRepo, head: WorkflowHead, state: State, message: str) -> bool:
    """Append a workflow event ending ``head`` in ``state``; False if an agent moved it first."""
    at = utc_now()
    status = end_workflow(head.status, state, at=at, message=message)
    event = Event(
        kind=EventKind.WORKFLOW,
        workflow=head.workflow.id,
        workflow_state=state,
        worker="",
        message=message,
        event_id=new_event_id(),
        created_at=at,
    )
    commit = append_event(repo, head.commit, status, event, RECONCILER)
    if not repo.update_ref(workflow_ref(head.workflow.id), commit, head.commit):
        log.info(
            "workflow %s moved while ending it %s; retrying on the next pass",
            head.workflow.id,
            state.value,
        )
        return False
    log.warning(
        "workflow %s ended %s: %s",
        head.workflow.id,
        state.value,
        message,
        extra={"workflow": head.workflow.id, "commit": commit},
    )
    return True


def _unqueue(repo: GitRepo, queue_refs: dict[str, str]) -> None:
    for ref, sha in queue_refs.items():
        repo.execute("update-ref", "-d", ref, sha)
