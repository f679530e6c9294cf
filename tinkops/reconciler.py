"""The reconciler: renders each new request on the main branch into an immutable workflow.

One pass observes (the main branch's tip, the rendered workflow refs), plans (which requests
need a workflow, pure), and applies (one commit and one atomic ref transaction per workflow).
Every write is a compare-and-swap, so a pass killed at any point leaves either no trace of a
workflow or all of it, and the next pass picks up where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tinkops.errors import InvalidContent, Problem
from tinkops.incremental import IncrementalReader
from tinkops.maintenance import archived_ids, maintain
from tinkops.objectwriter import ObjectWriter
from tinkops.planner import plan_workflow
from tinkops.repository import WORKFLOWS_DIR
from tinkops.supervisor import DEFAULT_GRACE, supervise
from tinkops.workflows import (
    RECONCILER,
    list_workflow_ids,
    publish_workflows,
    write_workflow_commit,
)
from tinkops.yamltext import dump
from tinkops_agent.gitrepo import GitRepo, TreeEntry
from tinkops_agent.protocol import (
    SIGNED_EVENTS_FIELD,
    STATUS_FILE,
    STATUS_REF,
    State,
    Workflow,
    workflow_ref,
)

log = logging.getLogger(__name__)

MAX_INVALID_EVENTS = 20
"""The maximum number of invalid events the status keeps per workflow (the latest ones)."""


def precise_now() -> str:
    """Return the current UTC time with microseconds; workflows are queued in this order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ReconcilerStatus:
    """The reconciler's latest outcome, stored on ``refs/tinkops/status`` as ``status.yaml``."""

    branch: str
    reconciled_commit: str | None = None
    updated_at: str = ""
    invalid_files: dict[str, list[str]] = field(default_factory=dict)
    failed_requests: dict[str, list[str]] = field(default_factory=dict)
    require_signed_events: bool = False
    """Agents read this to decide whether to sign their events."""
    invalid_events: dict[str, list[str]] = field(default_factory=dict)
    """Commits of workflow refs that were not validly signed events, by workflow id."""

    def to_yaml(self) -> str:
        return dump(
            {
                "branch": self.branch,
                "reconciled_commit": self.reconciled_commit,
                "updated_at": self.updated_at,
                "invalid_files": self.invalid_files,
                "failed_requests": self.failed_requests,
                SIGNED_EVENTS_FIELD: self.require_signed_events,
                "invalid_events": self.invalid_events,
            }
        )

    @classmethod
    def from_yaml(cls, text: str, branch: str) -> ReconcilerStatus:
        data: dict[str, Any] = yaml.safe_load(text) or {}
        return cls(
            branch=str(data.get("branch") or branch),
            reconciled_commit=data.get("reconciled_commit"),
            updated_at=str(data.get("updated_at") or ""),
            invalid_files={str(k): list(v) for k, v in (data.get("invalid_files") or {}).items()},
            failed_requests={
                str(k): list(v) for k, v in (data.get("failed_requests") or {}).items()
            },
            require_signed_events=data.get(SIGNED_EVENTS_FIELD) is True,
            invalid_events={str(k): list(v) for k, v in (data.get("invalid_events") or {}).items()},
        )


@dataclass(frozen=True)
class PassResult:
    commit: str | None
    created: tuple[str, ...] = ()
    failed: dict[str, list[str]] = field(default_factory=dict)
    ended: dict[str, State] = field(default_factory=dict)
    next_deadline: float | None = None
    """POSIX time when the next pass must run to enforce a global_timeout."""


def read_status(repo: GitRepo, branch: str) -> ReconcilerStatus:
    commit = repo.rev_parse(STATUS_REF)
    text = repo.read_file(commit, STATUS_FILE) if commit else None
    if text is None:
        return ReconcilerStatus(branch=branch)
    return ReconcilerStatus.from_yaml(text.decode(), branch)


class Reconciler:
    """Renders requests of ``branch`` in the bare repository ``repo``."""

    def __init__(
        self,
        repo: GitRepo,
        branch: str = "main",
        clock: Callable[[], str] = precise_now,
        timeout_grace: float = DEFAULT_GRACE,
        require_signed_events: bool = False,
    ) -> None:
        self.repo = repo
        self.branch = branch
        self.clock = clock
        self.timeout_grace = timeout_grace
        self.require_signed_events = require_signed_events
        self.invalid_events: dict[str, list[str]] = {}
        """Invalid events found since the last status write; the next pass records them."""
        # Bare repositories get their objects written directly, in one pack per pass.
        self.writer = ObjectWriter(repo.path) if (repo.path / "objects").is_dir() else None
        self.reader = IncrementalReader(repo)
        self._lock = threading.Lock()
        # What the pass needs to know without listing every workflow ref or request each time:
        # the ids rendered so far, and the requests still waiting (failed, or not yet seen).
        self._rendered: set[str] | None = None
        self._pending: set[str] = set()
        self._rescan = False

    def forget_refs(self) -> None:
        """Make the next pass list the workflow refs again and consider every request.

        Call it after something other than this reconciler rewrote the refs, such as a fetch
        from the remote in remote mode.
        """
        with self._lock:
            self._rendered = None
            self._rescan = True

    def reconcile(self) -> PassResult:
        """Run one pass; safe to call from several threads (passes run one at a time)."""
        with self._lock:
            return self._pass()

    def _pass(self) -> PassResult:
        tip = self.repo.rev_parse(f"refs/heads/{self.branch}")
        if tip is None:
            supervision = supervise(self.repo, grace=self.timeout_grace)
            return PassResult(
                commit=None, ended=supervision.ended, next_deadline=supervision.next_deadline
            )
        status = read_status(self.repo, self.branch)
        snapshot = self.reader.read(tip)
        if self._rendered is None:
            # Archived workflows keep their requests on main; they must never render again.
            self._rendered = set(list_workflow_ids(self.repo)) | set(archived_ids(self.repo))
        rendered = self._rendered
        if self.reader.changed is None or self._rescan:
            self._rescan = False
            candidates = set(snapshot.requests)
        else:
            changed = {
                path.rpartition("/")[2].rsplit(".", 1)[0]
                for path in self.reader.changed
                if path.startswith(WORKFLOWS_DIR + "/")
            }
            candidates = self._pending | changed
        candidates = {wid for wid in candidates if wid in snapshot.requests} - rendered

        failed: dict[str, list[str]] = {}
        rendered_now: list[tuple[Workflow, str]] = []
        if self.writer is not None:
            self.writer.batch()
        for workflow_id in sorted(candidates):
            request = snapshot.requests[workflow_id]
            if workflow_id in rendered or request.cancel:
                # A request cancelled before it was rendered never becomes a workflow.
                continue
            try:
                workflow = plan_workflow(snapshot, request, self.clock())
            except InvalidContent as error:
                failed[workflow_id] = [str(problem) for problem in error.problems]
                if status.failed_requests.get(workflow_id) != failed[workflow_id]:
                    log.warning(
                        "request %s not rendered: %s",
                        request.file,
                        "; ".join(failed[workflow_id]),
                        extra={"workflow": workflow_id, "request": request.file},
                    )
                continue
            rendered_now.append(
                (workflow, write_workflow_commit(self.repo, workflow, writer=self.writer))
            )
        if self.writer is not None:
            self.writer.flush()
        created = publish_workflows(self.repo, rendered_now)
        for workflow, _commit in rendered_now:
            # Ids another reconciler created first are rendered all the same.
            if workflow.id in created or self.repo.rev_parse(workflow_ref(workflow.id)):
                rendered.add(workflow.id)
        self._pending = candidates - rendered
        for workflow, commit in rendered_now:
            if workflow.id in created:
                log.info(
                    "rendered workflow %s from %s at %s (commit %s)",
                    workflow.id,
                    workflow.request,
                    tip[:12],
                    commit[:12],
                    extra={"workflow": workflow.id, "commit": commit, "request": workflow.request},
                )

        self._write_status(status, tip, snapshot.problems, failed)
        cancelled = {wid for wid, request in snapshot.requests.items() if request.cancel}
        supervision = supervise(self.repo, cancelled=cancelled, grace=self.timeout_grace)
        return PassResult(
            commit=tip,
            created=tuple(created),
            failed=failed,
            ended=supervision.ended,
            next_deadline=supervision.next_deadline,
        )

    def _write_status(
        self,
        previous: ReconcilerStatus,
        tip: str,
        problems: list[Problem],
        failed: dict[str, list[str]],
    ) -> None:
        invalid: dict[str, list[str]] = {}
        for problem in problems:
            invalid.setdefault(problem.file, []).append(str(problem))
        invalid_events = _merge_invalid_events(previous.invalid_events, self.invalid_events)
        if (
            previous.reconciled_commit == tip
            and previous.invalid_files == invalid
            and previous.failed_requests == failed
            and previous.require_signed_events == self.require_signed_events
            and previous.invalid_events == invalid_events
        ):
            return
        for file, messages in invalid.items():
            if previous.invalid_files.get(file) != messages:
                log.warning("invalid file %s: %s", file, "; ".join(messages))
        status = ReconcilerStatus(
            branch=self.branch,
            reconciled_commit=tip,
            updated_at=self.clock(),
            invalid_files=invalid,
            failed_requests=failed,
            require_signed_events=self.require_signed_events,
            invalid_events=invalid_events,
        )
        blob = self.repo.write_blob(status.to_yaml().encode())
        root = self.repo.write_root(None, {STATUS_FILE: TreeEntry("100644", "blob", blob)})
        commit = self.repo.commit_tree(
            root, [], f"Reconcile {self.branch} at {tip[:12]}\n", RECONCILER
        )
        old = self.repo.rev_parse(STATUS_REF)
        if self.repo.update_ref(STATUS_REF, commit, old):
            self.invalid_events = {}
        else:
            log.info("status ref moved during the pass; the next pass rewrites it")


def _merge_invalid_events(
    recorded: dict[str, list[str]], found: dict[str, list[str]]
) -> dict[str, list[str]]:
    merged = {workflow: list(messages) for workflow, messages in recorded.items()}
    for workflow, messages in found.items():
        known = merged.setdefault(workflow, [])
        known += [message for message in messages if message not in known]
        merged[workflow] = known[-MAX_INVALID_EVENTS:]
    return merged


class ReconcileLoop:
    """Runs passes when triggered (push hook, file events) and on a polling interval."""

    def __init__(
        self,
        reconciler: Reconciler,
        poll_interval: float = 30.0,
        debounce: float = 0.02,
        on_pass: Callable[[float, PassResult | None], None] | None = None,
        maintenance_interval: float = 3600.0,
        archive_after_days: float | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.on_pass = on_pass
        self.maintenance_interval = maintenance_interval
        self.archive_after_days = archive_after_days
        self._maintained_at = time.monotonic()
        self.poll_interval = poll_interval
        self.debounce = debounce
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self.passes = 0

    def trigger(self) -> None:
        self._wake.set()

    def start(self, watch: Path | None = None) -> None:
        if watch is not None:
            self._observer = _watch_refs(watch, self.trigger)
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def _run(self) -> None:
        log.info("reconciler started (poll every %.0f s)", self.poll_interval)
        next_deadline: float | None = None
        while not self._stop.is_set():
            wait = self.poll_interval
            if next_deadline is not None:
                wait = max(0.0, min(wait, next_deadline - time.time()))
            self._wake.wait(timeout=wait)
            if self._stop.is_set():
                break
            time.sleep(self.debounce)
            self._wake.clear()
            started = time.monotonic()
            result: PassResult | None = None
            try:
                result = self.reconciler.reconcile()
                next_deadline = result.next_deadline
            except Exception:
                # A pass that fails must never end the loop; the next trigger or poll retries.
                log.exception("reconcile pass failed; retrying on the next trigger")
            if self.on_pass is not None:
                self.on_pass(time.monotonic() - started, result)
            if time.monotonic() - self._maintained_at > self.maintenance_interval:
                self._maintain()
            self.passes += 1
        log.info("reconciler stopped")

    def _maintain(self) -> None:
        self._maintained_at = time.monotonic()
        try:
            maintain(self.reconciler.repo, archive_after_days=self.archive_after_days)
        except Exception:
            log.exception(
                "repository maintenance failed; retrying in %.0f s", self.maintenance_interval
            )


def _watch_refs(repository: Path, callback: Callable[[], None]) -> Any:
    """Watch the bare repository's refs with watchdog; every event is only a hint."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    # Only changes count: every git command opens packed-refs, so reacting to opens and
    # closes would wake the reconciler with its own reads, forever.
    changes = {"created", "modified", "moved", "deleted"}

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type not in changes or event.is_directory:
                return
            path = str(event.dest_path or event.src_path)
            if path.endswith(".lock"):
                return
            if "/refs/heads/" in path or path.endswith("/packed-refs"):
                callback()

    observer = Observer()
    observer.schedule(Handler(), str(repository), recursive=False)
    (repository / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    observer.schedule(Handler(), str(repository / "refs" / "heads"), recursive=True)
    observer.daemon = True
    observer.start()
    return observer
