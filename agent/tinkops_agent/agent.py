"""The worker agent: finds its workflows, runs its actions in order, records every event.

Each event is first written as a commit on a local outbox ref, then pushed. A crash between
the two leaves the commit in the outbox, and the next start pushes it, so no event is lost or
recorded twice. An action that was RUNNING when the agent stopped is never re-run blindly:
it is recorded FAILED with the reason (the restart policy).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tinkops_agent.eventlog import (
    WorkflowHead,
    append_event,
    new_event_id,
    parse_time,
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
from tinkops_agent.remote import KeyRejected, PushOutcome, Remote
from tinkops_agent.runtime import (
    LABEL_AGENT,
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
REBOOT_MESSAGE = "the machine restarted during this action, which declares that it reboots it"


class Superseded(Exception):
    """The workflow ref moved under the agent (the provisioner ended or cancelled it)."""


class EventRejected(Exception):
    """The provisioner rejected an event although nothing moved, so its policy rejected it."""


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
    cancel_check_interval: float = 2.0
    """Seconds between checks, while an action runs, for the provisioner ending the workflow."""
    poll_jitter: float = 0.1
    """Each idle wait is ``poll_interval`` times a random factor within 1 ± this fraction, so
    agents that start together do not keep polling together."""
    sign_events: bool | None = None
    """Sign event commits with ``signing_key``: True always, False never, None when the
    provisioner's status requires signed events."""
    signing_key: Path | None = None
    """The private SSH key that signs events (the key the agent authenticates with)."""


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
        self._blocked: dict[str, float] = {}
        """Workflow id: when to try again after the provisioner rejected one of its events."""
        # Several agents may serve one worker id by mistake; each knows its own actions by
        # this id, derived from the host and the state folder so it survives restarts.
        origin = f"{socket.gethostname()}:{config.state_dir.resolve()}"
        self.instance = hashlib.sha256(origin.encode()).hexdigest()[:12]

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Work until ``stop`` is set: replay the outbox, then poll and run workflows."""
        log.info("agent %s started with %s", self.worker, self.runtime.describe())
        removed = self.runtime.cleanup({LABEL_WORKER: self.worker, LABEL_AGENT: self.instance})
        if removed:
            log.warning("removed %d container(s) left by an earlier run", removed)
        delay = self.config.poll_interval
        while not self.stop.is_set():
            try:
                self.replay_outbox()
                worked = self.step()
                delay = self.config.poll_interval
            except KeyRejected as error:
                # The key may be added to the hardware record later: keep trying, slowly.
                log.error("%s; retrying in %.1f s", error, delay)
                worked = False
                delay = min(delay * 2, self.config.max_retry_delay)
            except (ConnectionError, OSError) as error:
                log.warning("provisioner unreachable (%s); retrying in %.1f s", error, delay)
                worked = False
                delay = min(delay * 2, self.config.max_retry_delay)
            except Stopping:
                break
            if not worked:
                self.stop.wait(self._jittered(delay))
        log.info("agent %s stopped", self.worker)

    def _jittered(self, delay: float) -> float:
        spread = max(0.0, min(self.config.poll_jitter, 1.0))
        return delay * random.uniform(1 - spread, 1 + spread)

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
        now = time.monotonic()
        for head in heads:
            if self._blocked.get(head.workflow.id, 0.0) > now:
                continue
            if runnable_by(head.workflow, head.status, self.worker):
                try:
                    self.run_workflow(head)
                except Superseded as error:
                    log.warning(
                        "workflow %s changed on the provisioner: %s", head.workflow.id, error
                    )
                except EventRejected as error:
                    # Pushing the same event again gets the same answer: wait before retrying
                    # this workflow, and let the others run meanwhile.
                    log.error(
                        "the provisioner rejected an event of workflow %s (%s); retrying it "
                        "in %.0f s",
                        head.workflow.id,
                        error,
                        self.config.max_retry_delay,
                    )
                    self._blocked[head.workflow.id] = now + self.config.max_retry_delay
                    continue
                return True
        return False

    # --- one workflow -----------------------------------------------------------------------

    def run_workflow(self, head: WorkflowHead) -> None:
        """Run this worker's consecutive actions of one workflow, recording every event."""
        workdir = self._prepare_workdir(head)
        for index in runnable_by(head.workflow, head.status, self.worker):
            if self.stop.is_set():
                return
            next_head = self._run_action(head, index, workdir)
            if next_head is None or next_head.status.state.terminal:
                return
            head = next_head

    def _run_action(self, head: WorkflowHead, index: int, workdir: Path) -> WorkflowHead | None:
        """Run action ``index``; return the new head, or None when the workflow must stop."""
        workflow_id = head.workflow.id
        _task, action = head.workflow.flat_actions()[index]
        current = head.status.actions[index]
        if current.state is State.RUNNING:
            if (workflow_id, index) not in self._started:
                if (
                    current.agent
                    and current.agent != self.instance
                    and not self._abandoned(head, index)
                ):
                    log.info(
                        "workflow %s action %r runs under another agent (%s); leaving it",
                        workflow_id,
                        action.name,
                        current.agent,
                    )
                    return None
                return self._recover_restart(head, index)
        else:
            remaining = self._global_remaining(head)
            if remaining is not None and remaining <= 0:
                message = f"global_timeout of {head.workflow.global_timeout} s exceeded"
                self._record(head, index, State.TIMEOUT, message)
                return None
            head = self._record(
                head, index, State.RUNNING, "Started execution", agent=self.instance
            )
        self._started.add((workflow_id, index))

        log.info("workflow %s: running action %r (%s)", workflow_id, action.name, action.image)
        started = time.monotonic()
        attempts = action.retries + 1
        attempt = 1
        while True:
            result = self._attempt(head, index, workdir, started)
            if result is None:
                return None
            if result.state is not State.FAILED or attempt == attempts:
                break
            if self._budget_left(head, index, started) == 0:
                break
            message = f"attempt {attempt} of {attempts} failed ({result.message}); retrying"
            head = self._record(
                head,
                index,
                State.RUNNING,
                message,
                seconds=round(result.seconds),
                log_tail=result.log_tail,
                attempt=attempt,
            )
            attempt += 1
        head = self._record_result(
            head, index, result, workdir, attempt=attempt if attempts > 1 else 0
        )
        if head.status.state in (State.FAILED, State.TIMEOUT):
            self._run_handler(head, index, result, workdir)
        return head

    def _attempt(
        self, head: WorkflowHead, index: int, workdir: Path, started: float
    ) -> RunResult | None:
        """Run one attempt within what is left of the action's and the workflow's time."""
        task, action = head.workflow.flat_actions()[index]
        budget = self._budget_left(head, index, started)
        try:
            spec = build_spec(head.workflow.id, index, task, action, workdir, budget)
            if budget is not None and spec.timeout is not None:
                spec = replace(spec, timeout=min(spec.timeout, budget))
            spec = replace(spec, labels={**spec.labels, LABEL_AGENT: self.instance})
        except (ActionSpecError, ValueError) as error:
            self._record(head, index, State.FAILED, f"could not run: {error}")
            return None

        cancel = threading.Event()
        watcher = threading.Thread(
            target=self._watch_for_end,
            args=(head, cancel),
            name=f"watch-{head.workflow.id}",
            daemon=True,
        )
        watcher.start()
        try:
            result = self.runtime.run(
                spec, self._log_path(head.workflow.id, index, action.name), cancel
            )
        except ContainerRuntimeError as error:
            log.error(
                "workflow %s action %r could not run: %s", head.workflow.id, action.name, error
            )
            self._record(head, index, State.FAILED, f"could not run: {error}")
            return None
        finally:
            cancel.set()
            watcher.join()

        if result.state is State.CANCELLED:
            self._record_stopped(head, index, result)
            return None
        global_left = self._global_remaining(head)
        if result.state is State.TIMEOUT and global_left is not None and global_left <= 1:
            result = replace(
                result,
                message=f"global_timeout of "
                f"{head.workflow.global_timeout} s exceeded; {result.message}",
            )
        return result

    def _budget_left(self, head: WorkflowHead, index: int, started: float) -> float | None:
        """Return the seconds this action may still run (its timeout and the workflow's)."""
        _task, action = head.workflow.flat_actions()[index]
        limits = []
        own = float(action.timeout) if action.timeout > 0 else self.config.default_action_timeout
        if own is not None:
            limits.append(own - (time.monotonic() - started))
        global_left = self._global_remaining(head)
        if global_left is not None:
            limits.append(global_left)
        return max(0.0, min(limits)) if limits else None

    def _global_remaining(self, head: WorkflowHead) -> float | None:
        """Return the seconds left of the workflow's global_timeout (None: no limit).

        The clock starts at the first action's start; 0 or a missing global_timeout means the
        workflow has no overall limit.
        """
        limit = head.workflow.global_timeout
        if limit <= 0:
            return None
        started = parse_time(head.status.started_at) if head.status.started_at else time.time()
        return started + limit - time.time()

    def _watch_for_end(self, head: WorkflowHead, cancel: threading.Event) -> None:
        """Stop the running action when the provisioner ends the workflow (cancel, timeout)."""
        while not cancel.wait(self.config.cancel_check_interval):
            try:
                tip = self.remote.fetch_workflows([head.workflow.id]).get(head.workflow.id)
                if tip is None or tip == head.commit:
                    continue
                if read_workflow_head(self.local, tip).status.state.terminal:
                    log.warning(
                        "workflow %s was ended on the provisioner; stopping its action",
                        head.workflow.id,
                    )
                    cancel.set()
            except (ConnectionError, OSError, ProtocolError) as error:
                log.debug(
                    "checking workflow %s for cancellation failed: %s", head.workflow.id, error
                )
            if self.stop.is_set():
                cancel.set()

    def _record_stopped(self, head: WorkflowHead, index: int, result: RunResult) -> None:
        """Record that the action's container was stopped because the workflow ended."""
        if self.stop.is_set():
            return  # The agent is shutting down; the restart policy applies on the next start.
        tip = self.remote.fetch_workflows([head.workflow.id]).get(head.workflow.id)
        if tip is None:
            return
        current = read_workflow_head(self.local, tip)
        ended = current.status.state
        if not ended.terminal:
            return
        self._record(
            current,
            index,
            ended,
            f"container stopped because the workflow ended {ended.value}",
            seconds=round(result.seconds),
            log_tail=result.log_tail,
        )

    def _abandoned(self, head: WorkflowHead, index: int) -> bool:
        """Return whether another agent's RUNNING action outlived every limit it had."""
        _task, action = head.workflow.flat_actions()[index]
        limit = float(action.timeout) if action.timeout > 0 else self.config.default_action_timeout
        started = head.status.actions[index].started_at
        if limit is None or not started:
            return False
        return time.time() > parse_time(started) + limit + self.config.max_retry_delay

    def _recover_restart(self, head: WorkflowHead, index: int) -> WorkflowHead | None:
        """Apply the restart policy to an action that was RUNNING when the agent started."""
        _task, action = head.workflow.flat_actions()[index]
        if action.reboot:
            log.info(
                "workflow %s action %r rebooted the machine as declared; recording SUCCESS",
                head.workflow.id,
                action.name,
            )
            return self._record(head, index, State.SUCCESS, REBOOT_MESSAGE)
        log.warning(
            "workflow %s action %r was RUNNING when the agent started; recording FAILED",
            head.workflow.id,
            action.name,
        )
        self._record(head, index, State.FAILED, RESTART_MESSAGE)
        return None

    def _record_result(
        self, head: WorkflowHead, index: int, result: RunResult, workdir: Path, *, attempt: int = 0
    ) -> WorkflowHead:
        message = result.message
        if result.notes:
            message = f"{message} ({'; '.join(result.notes)})"
        ephemeral, size = collect_ephemeral(workdir)
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
            attempt=attempt,
        )

    def _run_handler(
        self, head: WorkflowHead, index: int, result: RunResult, workdir: Path
    ) -> None:
        """Run the action's on-failure or on-timeout command; record its outcome as an event."""
        task, action = head.workflow.flat_actions()[index]
        command = action.on_timeout if result.state is State.TIMEOUT else action.on_failure
        if not command:
            return
        kind = "on-timeout" if result.state is State.TIMEOUT else "on-failure"
        handler = replace(action, name=f"{action.name} {kind}", command=command)
        try:
            spec = build_spec(
                head.workflow.id, index, task, handler, workdir, self.config.default_action_timeout
            )
            spec = replace(spec, labels={**spec.labels, LABEL_AGENT: self.instance})
            outcome = self.runtime.run(spec, self._log_path(head.workflow.id, index, handler.name))
        except (ActionSpecError, ContainerRuntimeError, ValueError) as error:
            message, seconds, tail = f"{kind} handler could not run: {error}", 0, ""
        else:
            message = f"{kind} handler ended {outcome.state.value}: {outcome.message}"
            seconds, tail = round(outcome.seconds), outcome.log_tail
        event = self._event(
            head,
            index,
            head.status.actions[index].state,
            message,
            seconds=seconds,
            log_tail=tail,
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
        attempt: int = 0,
        agent: str | None = None,
    ) -> WorkflowHead:
        status = apply_action_event(
            head.status,
            index,
            state,
            at=utc_now(),
            seconds=seconds,
            message=message,
            agent=agent,
        )
        event = self._event(
            head,
            index,
            state,
            message,
            seconds=seconds,
            log_tail=log_tail,
            status=status,
            attempt=attempt,
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
        attempt: int = 0,
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
            attempt=attempt,
        )

    def _publish(
        self,
        head: WorkflowHead,
        status: WorkflowStatus,
        event: Event,
        ephemeral: dict[str, bytes] | None,
    ) -> WorkflowHead:
        commit = append_event(
            self.local,
            head.commit,
            status,
            event,
            self.identity,
            ephemeral,
            signing_key=self._signing_key(),
        )
        # The outbox ref makes the event durable before it leaves the machine.
        self.local.run("update-ref", OUTBOX + head.workflow.id, commit)
        self._deliver(head.workflow.id, commit)
        log.info("workflow %s: %s", head.workflow.id, event.subject())
        return WorkflowHead(commit, head.workflow, status)

    def _signing_key(self) -> Path | None:
        """Return the key to sign the next event with, or None to leave it unsigned."""
        sign = self.config.sign_events
        if sign is None:
            sign = self.remote.signatures_required
        if not sign:
            return None
        if self.config.signing_key is None:
            log.error("the provisioner requires signed events, but no signing key is configured")
        return self.config.signing_key

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
        if tip is not None and tip == self.local.rev_parse(f"{commit}^"):
            raise EventRejected(detail)
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


def collect_ephemeral(workdir: Path) -> tuple[dict[str, bytes] | None, int]:
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
