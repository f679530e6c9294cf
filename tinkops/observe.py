"""What an operator watches: reconciler lag, invalid files, workflows by state, metrics.

``collect_status`` reads everything from the repository, so ``tinkops status`` works on any
clone that fetched ``refs/tinkops/*``. ``Metrics`` keeps the running provisioner's counters
and serves them in Prometheus' text format on a loopback HTTP port.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tinkops.reconciler import read_status
from tinkops.workflows import list_workflow_ids
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import STATE_FILE, ProtocolError, State, WorkflowStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusReport:
    branch: str
    main_commit: str | None
    reconciled_commit: str | None
    commits_behind: int
    lag_seconds: float
    """Seconds since the oldest commit of main the reconciler has not handled; 0 when caught up."""
    invalid_files: dict[str, list[str]]
    failed_requests: dict[str, list[str]]
    workflows: dict[str, int] = field(default_factory=dict)


def count_workflow_states(repo: GitRepo) -> dict[str, int]:
    """Return how many workflows are in each state, read with one ``git cat-file``."""
    tips = list_workflow_ids(repo)
    names = [f"{tip}:{STATE_FILE}" for tip in tips.values()]
    counts: Counter[str] = Counter({state.value: 0 for state in State})
    for raw in repo.read_objects(names).values():
        try:
            counts[WorkflowStatus.from_json(raw or b"").state.value] += 1
        except ProtocolError:
            counts["UNREADABLE"] += 1
    return dict(counts)


def collect_status(
    repo: GitRepo, branch: str = "main", *, now: float | None = None
) -> StatusReport:
    now = time.time() if now is None else now
    status = read_status(repo, branch)
    tip = repo.rev_parse(f"refs/remotes/origin/{branch}") or repo.rev_parse(f"refs/heads/{branch}")
    behind = 0
    lag = 0.0
    if tip is not None and tip != status.reconciled_commit:
        if status.reconciled_commit and repo.rev_parse(status.reconciled_commit):
            pending = repo.text(
                "rev-list",
                "--reverse",
                "--format=%ct",
                "--no-commit-header",
                f"{status.reconciled_commit}..{tip}",
            ).split()
        else:
            pending = repo.text("log", "-1", "--format=%ct", tip).split()
        behind = len(pending)
        if pending:
            lag = max(0.0, now - int(pending[0]))
    return StatusReport(
        branch=branch,
        main_commit=tip,
        reconciled_commit=status.reconciled_commit,
        commits_behind=behind,
        lag_seconds=lag,
        invalid_files=status.invalid_files,
        failed_requests=status.failed_requests,
        workflows=count_workflow_states(repo),
    )


class Metrics:
    """Counters of one running provisioner, rendered in Prometheus' text format."""

    def __init__(self, repo: GitRepo, branch: str, *, state_cache_seconds: float = 15.0) -> None:
        self.repo = repo
        self.branch = branch
        self.state_cache_seconds = state_cache_seconds
        self._lock = threading.Lock()
        self.passes = 0
        self.pass_seconds_total = 0.0
        self.last_pass_seconds = 0.0
        self.pass_failures = 0
        self.workflows_created = 0
        self.push_rejections = 0
        self._states: dict[str, int] = {}
        self._states_at = 0.0

    def record_pass(self, seconds: float, created: int, failed: bool = False) -> None:
        with self._lock:
            self.passes += 1
            self.pass_seconds_total += seconds
            self.last_pass_seconds = seconds
            self.workflows_created += created
            self.pass_failures += int(failed)

    def record_push_rejection(self) -> None:
        with self._lock:
            self.push_rejections += 1

    def render(self) -> str:
        report = collect_status(self.repo, self.branch)
        with self._lock:
            if time.monotonic() - self._states_at > self.state_cache_seconds:
                self._states = report.workflows
                self._states_at = time.monotonic()
            lines = [
                "# HELP tinkops_reconcile_passes_total Reconcile passes run.",
                "# TYPE tinkops_reconcile_passes_total counter",
                f"tinkops_reconcile_passes_total {self.passes}",
                "# HELP tinkops_reconcile_failures_total Reconcile passes that raised an error.",
                "# TYPE tinkops_reconcile_failures_total counter",
                f"tinkops_reconcile_failures_total {self.pass_failures}",
                "# HELP tinkops_reconcile_duration_seconds Time spent in reconcile passes.",
                "# TYPE tinkops_reconcile_duration_seconds summary",
                f"tinkops_reconcile_duration_seconds_sum {self.pass_seconds_total:.6f}",
                f"tinkops_reconcile_duration_seconds_count {self.passes}",
                "# HELP tinkops_reconcile_last_duration_seconds Duration of the latest pass.",
                "# TYPE tinkops_reconcile_last_duration_seconds gauge",
                f"tinkops_reconcile_last_duration_seconds {self.last_pass_seconds:.6f}",
                "# HELP tinkops_reconcile_lag_seconds Age of the oldest unreconciled commit.",
                "# TYPE tinkops_reconcile_lag_seconds gauge",
                f"tinkops_reconcile_lag_seconds {report.lag_seconds:.3f}",
                "# HELP tinkops_reconcile_commits_behind Commits of main not yet reconciled.",
                "# TYPE tinkops_reconcile_commits_behind gauge",
                f"tinkops_reconcile_commits_behind {report.commits_behind}",
                "# HELP tinkops_invalid_files Files of main that failed validation.",
                "# TYPE tinkops_invalid_files gauge",
                f"tinkops_invalid_files {len(report.invalid_files)}",
                "# HELP tinkops_failed_requests Requests that could not be rendered.",
                "# TYPE tinkops_failed_requests gauge",
                f"tinkops_failed_requests {len(report.failed_requests)}",
                "# HELP tinkops_workflows_created_total Workflows rendered by this process.",
                "# TYPE tinkops_workflows_created_total counter",
                f"tinkops_workflows_created_total {self.workflows_created}",
                "# HELP tinkops_push_rejections_total Pushes the provisioner rejected.",
                "# TYPE tinkops_push_rejections_total counter",
                f"tinkops_push_rejections_total {self.push_rejections}",
                "# HELP tinkops_workflows Workflows by state.",
                "# TYPE tinkops_workflows gauge",
            ]
            lines += [
                f'tinkops_workflows{{state="{state}"}} {count}'
                for state, count in sorted(self._states.items())
            ]
        return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``/metrics`` over HTTP on ``host:port`` (loopback by default)."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 0) -> None:
        metrics_ref = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = metrics_ref.render().encode()
                except Exception:
                    log.exception("rendering metrics failed")
                    self.send_error(500, "rendering metrics failed; see the provisioner log")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics request: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
