"""The worker agent: finds its workflows, runs its actions in order, records every event.

Each event is first written as a commit on a local outbox ref, then pushed. A crash between
the two leaves the commit in the outbox, and the next start pushes it, so no event is lost or
recorded twice. An action that was RUNNING when the agent stopped is never re-run blindly:
it is recorded FAILED with the reason (the restart policy).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from tinkops_agent.eventlog import (
    WorkflowHead,
    append_event,
    new_event_id,
    read_ephemeral,
    utc_now,
)
from tinkops_agent.eventlog import read_head as read_workflow_head
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.protocol import (
    DATA_FILE,
    Event,
    EventKind,
    ProtocolError,
    State,
    WorkflowStatus,
    apply_action_event,
    canonical_worker,
    runnable_by,
    worker_key,
)
from tinkops_agent.remote import PushOutcome, Remote
from tinkops_agent.runtime import (
    LABEL_WORKER,
    ActionSpecError,
    ContainerRuntimeError,
    RunResult,
    Runtime,
    build_spec,
)

log = logging.getLogger(__name__)

OUTBOX = "refs/outbox/"
# Tinkerbell's limit on ephemeral data, in bytes (10 MiB).
MAX_EPHEMERAL_BYTES = 10 * 1024 * 1024
RESTART_MESSAGE = "agent restarted during action; the action was not run again"


class Superseded(Exception):
    """The workflow ref moved under the agent (the provisioner ended or cancelled it)."""


class Stopping(Exception):
    """The agent was asked to stop while an event was still waiting to be delivered."""


@dataclass(frozen=True)
class AgentConfig:
    worker_id: str
    state_dir: Path
    poll_interval: float = 2.0
    default_action_timeout: float | None = 3600.0
    """Limit for actions whose timeout is 0 or missing (Tinkerbell's worker uses one hour);
    None runs them without a limit."""
    max_retry_delay: float = 30.0


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        local: GitRepo,
        remote: Remote,
        runtime: Runtime,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.worker = canonical_worker(config.worker_id)
        self.local = local
        self.remote = remote
        self.runtime = runtime
        self.stop = stop or threading.Event()
        self.identity = Identity(
            f"tinkops agent {self.worker}", f"{worker_key(self.worker)}@agents.tinkops.invalid"
        )
        self._started: set[tuple[str, int]] = set()

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Work until ``stop`` is set: replay the outbox, then poll and run workflows."""
        log.info("agent %s started with %s", self.worker, self.runtime.describe())
        removed = self.runtime.cleanup({LABEL_WORKER: self.worker})
        if removed:
            log.warning("removed %d container(s) left by an earlier run", removed)
        delay = self.config.poll_interval
        while not self.stop.is_set():
            try:
                self.replay_outbox()
                worked = self.step()
                delay = self.config.poll_interval
            except (ConnectionError, OSError) as error:
                log.warning("provisioner unreachable (%s); retrying in %.1f s", error, delay)
                worked = False
                delay = min(delay * 2, self.config.max_retry_delay)
            except Stopping:
                break
            if not worked:
                self.stop.wait(delay)
        log.info("agent %s stopped", self.worker)

    def step(self) -> bool:
        """Run the first workflow whose turn it is; return whether anything ran."""
        queued = self.remote.fetch_queue(self.worker)
        tips = self.remote.fetch_workflows(sorted(queued))
        heads = []
        for workflow_id, tip in tips.items():
            try:
                heads.append(read_workflow_head(self.local, tip))
            except ProtocolError as error:
                log.error("workflow %s is unreadable, skipped: %s", workflow_id, error)
        heads.sort(key=lambda head: (head.workflow.created_at, head.workflow.id))
        for head in heads:
            if runnable_by(head.workflow, head.status, self.worker):
                try:
                    self.run_workflow(head)
                except Superseded as error:
                    log.warning(
                        "workflow %s changed on the provisioner: %s", head.workflow.id, error
                    )
                return True
        return False

    # --- one workflow -----------------------------------------------------------------------

    def run_workflow(self, head: WorkflowHead) -> None:
        workflow_id = head.workflow.id
        workdir = self._prepare_workdir(head)
        actions = head.workflow.flat_actions()
        for index in runnable_by(head.workflow, head.status, self.worker):
            if self.stop.is_set():
                return
            task, action = actions[index]
            if head.status.actions[index].state is State.RUNNING:
                if (workflow_id, index) not in self._started:
                    log.warning(
                        "workflow %s action %r was RUNNING when the agent started; "
                        "recording FAILED",
                        workflow_id,
                        action.name,
                    )
                    self._record(head, index, State.FAILED, RESTART_MESSAGE)
                    return
            else:
                head = self._record(head, index, State.RUNNING, "Started execution")
            self._started.add((workflow_id, index))

            log.info("workflow %s: running action %r (%s)", workflow_id, action.name, action.image)
            try:
                spec = build_spec(
                    workflow_id,
                    index,
                    task,
                    action,
                    workdir,
                    self.config.default_action_timeout,
                )
                result = self.runtime.run(spec, self._log_path(workflow_id, index, action.name))
            except (ActionSpecError, ContainerRuntimeError) as error:
                log.error(
                    "workflow %s action %r could not run: %s", workflow_id, action.name, error
                )
                self._record(head, index, State.FAILED, f"could not run: {error}")
                return
            head = self._record_result(head, index, result, workdir)
            if head.status.state.terminal and head.status.state is not State.SUCCESS:
                self._run_handler(head, index, result, workdir)
                return

    def _record_result(
        self, head: WorkflowHead, index: int, result: RunResult, workdir: Path
    ) -> WorkflowHead:
        message = result.message
        if result.notes:
            message = f"{message} ({'; '.join(result.notes)})"
        ephemeral, size = _collect(workdir)
        state = result.state
        if size > MAX_EPHEMERAL_BYTES:
            state = State.FAILED
            message = (
                f"ephemeral data under /workflow exceeds the limit of "
                f"{MAX_EPHEMERAL_BYTES} bytes (at least {size}); the previous version "
                "is kept"
            )
            ephemeral = None
        return self._record(
            head,
            index,
            state,
            message,
            seconds=round(result.seconds),
            log_tail=result.log_tail,
            ephemeral=ephemeral,
        )

    def _run_handler(
        self, head: WorkflowHead, index: int, result: RunResult, workdir: Path
    ) -> None:
        task, action = head.workflow.flat_actions()[index]
        command = action.on_timeout if result.state is State.TIMEOUT else action.on_failure
        if not command:
            return
        kind = "on-timeout" if result.state is State.TIMEOUT else "on-failure"
        handler = replace(action, name=f"{action.name} {kind}", command=command)
        try:
            spec = build_spec(
                head.workflow.id,
                index,
                task,
                handler,
                workdir,
                self.config.default_action_timeout,
            )
            outcome = self.runtime.run(spec, self._log_path(head.workflow.id, index, handler.name))
        except (ActionSpecError, ContainerRuntimeError) as error:
            log.error("workflow %s %s handler could not run: %s", head.workflow.id, kind, error)
            return
        event = self._event(
            head,
            index,
            head.status.actions[index].state,
            f"{kind} handler ended {outcome.state.value}: {outcome.message}",
            seconds=round(outcome.seconds),
            log_tail=outcome.log_tail,
            kind=EventKind.HANDLER,
        )
        self._publish(head, head.status, event, None)

    # --- events -----------------------------------------------------------------------------

    def _record(
        self,
        head: WorkflowHead,
        index: int,
        state: State,
        message: str,
        *,
        seconds: int = 0,
        log_tail: str = "",
        ephemeral: dict[str, bytes] | None = None,
    ) -> WorkflowHead:
        status = apply_action_event(
            head.status, index, state, at=utc_now(), seconds=seconds, message=message
        )
        event = self._event(
            head, index, state, message, seconds=seconds, log_tail=log_tail, status=status
        )
        return self._publish(head, status, event, ephemeral)

    def _event(
        self,
        head: WorkflowHead,
        index: int,
        state: State,
        message: str,
        *,
        seconds: int = 0,
        log_tail: str = "",
        kind: EventKind = EventKind.ACTION,
        status: WorkflowStatus | None = None,
    ) -> Event:
        task, action = head.workflow.flat_actions()[index]
        return Event(
            kind=kind,
            workflow=head.workflow.id,
            workflow_state=(status or head.status).state,
            worker=self.worker,
            message=message,
            event_id=new_event_id(),
            created_at=utc_now(),
            task=task.name,
            action=action.name,
            action_index=index,
            action_state=state,
            seconds=seconds,
            log_tail=log_tail,
        )

    def _publish(
        self,
        head: WorkflowHead,
        status: WorkflowStatus,
        event: Event,
        ephemeral: dict[str, bytes] | None,
    ) -> WorkflowHead:
        commit = append_event(self.local, head.commit, status, event, self.identity, ephemeral)
        # The outbox ref makes the event durable before it leaves the machine.
        self.local.run("update-ref", OUTBOX + head.workflow.id, commit)
        self._deliver(head.workflow.id, commit)
        log.info("workflow %s: %s", head.workflow.id, event.subject())
        return WorkflowHead(commit, head.workflow, status)

    def _deliver(self, workflow_id: str, commit: str) -> None:
        delay = 0.2
        while True:
            result = self.remote.push(commit, workflow_id)
            if result.outcome is PushOutcome.ACCEPTED:
                self.local.delete_ref(OUTBOX + workflow_id)
                return
            if result.outcome is PushOutcome.REJECTED:
                self._settle_rejected(workflow_id, commit, result.detail)
                return
            log.warning(
                "push of workflow %s failed (%s); retrying in %.1f s",
                workflow_id,
                result.detail,
                delay,
            )
            if self.stop.wait(delay):
                raise Stopping
            delay = min(delay * 2, self.config.max_retry_delay)

    def _settle_rejected(self, workflow_id: str, commit: str, detail: str) -> None:
        tips = self.remote.fetch_workflows([workflow_id])
        tip = tips.get(workflow_id)
        self.local.delete_ref(OUTBOX + workflow_id)
        if tip is not None and self.local.is_ancestor(commit, tip):
            return  # An earlier attempt landed; nothing to do.
        raise Superseded(f"push rejected: {detail}")

    def replay_outbox(self) -> None:
        """Push events a crash left in the outbox, or drop those the provisioner superseded."""
        for ref, commit in self.local.refs(OUTBOX).items():
            workflow_id = ref[len(OUTBOX) :]
            tips = self.remote.fetch_workflows([workflow_id])
            tip = tips.get(workflow_id)
            if tip is not None and self.local.is_ancestor(commit, tip):
                self.local.delete_ref(ref)
                continue
            parent = self.local.rev_parse(f"{commit}^")
            if tip is not None and parent == tip:
                log.info("delivering workflow %s event left by an earlier run", workflow_id)
                try:
                    self._deliver(workflow_id, commit)
                except Superseded as error:
                    log.warning("dropped workflow %s event: %s", workflow_id, error)
                continue
            log.warning(
                "dropped workflow %s event %s: the workflow moved on without it",
                workflow_id,
                commit[:12],
            )
            self.local.delete_ref(ref)

    # --- files ------------------------------------------------------------------------------

    def _prepare_workdir(self, head: WorkflowHead) -> Path:
        """Lay out /workflow for this turn: the ephemeral data as the previous worker left it."""
        workdir = self.config.state_dir / "workflows" / head.workflow.id
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        files = read_ephemeral(self.local, head.commit)
        files.setdefault(DATA_FILE, b"{}")
        for name, content in files.items():
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return workdir

    def _log_path(self, workflow_id: str, index: int, action: str) -> Path:
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in action)[:60]
        path = self.config.state_dir / "logs" / workflow_id / f"{index:03d}-{slug}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def _collect(workdir: Path) -> tuple[dict[str, bytes] | None, int]:
    """Return every regular file under ``workdir`` by relative path, and their total size.

    Stops reading once the total passes the limit, so a huge write costs no memory.
    """
    files: dict[str, bytes] = {}
    total = 0
    for root, dirs, names in os.walk(workdir, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            total += path.stat().st_size
            if total > MAX_EPHEMERAL_BYTES:
                return None, total
            files[path.relative_to(workdir).as_posix()] = path.read_bytes()
    return files, total
