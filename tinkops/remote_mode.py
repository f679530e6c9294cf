"""Remote mode: the reconciler works against a repository on an external SSH git server.

The server (GitLab, Gitea, or any OpenSSH server with git) keeps the repository. tinkops needs
only fetch and push over SSH there, no shell and no hooks. The reconciler keeps a local bare
mirror and, on every poll:

1. asks the server for the main branch's tip (``git ls-remote --heads``, one ref);
2. fetches: everything under ``refs/tinkops/`` when main moved (or the periodic full sync is
   due), else only the queue refs, the status ref and the refs of queued workflows, which costs
   what the active workflows cost, not the whole history;
3. checks the new commits of every workflow ref that moved: each must be an event signed by
   the worker it names (``tinkops.signatures``). A ref is reset to the commit before its first
   invalid one, the rejected commits stay reachable under ``refs/tinkops/rejected/``, and the
   status ref lists them;
4. runs the ordinary reconciler pass on the mirror (render, status, supervision);
5. pushes every ref the pass changed in one ``git push --atomic``, each with
   ``--force-with-lease`` on the value fetched, so a ref that moved on the server meanwhile
   (an agent's event) fails the whole push. Then it fetches again, runs the pass again and
   retries, a bounded number of times.

Agents push their events straight to the same server.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tinkops.errors import ConfigError, TransportError
from tinkops.reconciler import PassResult, Reconciler
from tinkops.signatures import (
    AllowedSigners,
    EventVerifier,
    InvalidEvent,
    public_key_of,
    signers_at,
)
from tinkops.supervisor import DEFAULT_GRACE
from tinkops_agent.gitrepo import GitError, GitRepo, init_bare
from tinkops_agent.protocol import (
    QUEUE_REF_PREFIX,
    STATUS_REF,
    WORKFLOW_REF_PREFIX,
    State,
    workflow_ref,
)
from tinkops_agent.remote import Endpoint, HostKeyError, pin_host_key, ssh_command

log = logging.getLogger(__name__)

TINKOPS_PREFIX = "refs/tinkops/"
REJECTED_REF_PREFIX = "refs/tinkops/rejected/"
"""``refs/tinkops/rejected/<workflow>/<first invalid commit>`` keeps a rejected history."""
MIRROR_DIR = "mirror.git"
KNOWN_HOSTS_FILE = "known_hosts"
SCRATCH_DIR = "scratch"

# git's messages for a push that lost a race or broke a rule (LC_ALL=C is set by GitRepo).
_REJECTED_MARKERS = ("[rejected]", "[remote rejected]", "stale info", "atomic push failed")
_MISSING_REF_MARKER = "couldn't find remote ref"


@dataclass(frozen=True)
class RemoteSettings:
    """Settings of the remote reconciler: the repository's location, keys and intervals."""

    url: str
    """``ssh://[USER@]HOST[:PORT]/PATH`` of the infrastructure repository."""
    key: Path
    """The private SSH key (no passphrase) that authenticates and signs the reconciler's
    own commits."""
    home: Path
    """The folder of the local mirror, the pinned host key and scratch files."""
    branch: str = "main"
    poll_interval: float = 10.0
    """Seconds between two checks of the server."""
    full_sync_interval: float = 600.0
    """Seconds between full fetches of ``refs/tinkops/`` while main does not move; they catch
    changes to workflows that are no longer queued."""
    timeout_grace: float = DEFAULT_GRACE
    require_signed_events: bool = True
    """Accept only events signed by their worker's key, and record that requirement in the
    status ref, where agents read it."""
    max_push_attempts: int = 5
    """Attempts (fetch, pass, push) before a sync gives up until the next poll."""

    @property
    def mirror(self) -> Path:
        return self.home / MIRROR_DIR

    @property
    def known_hosts(self) -> Path:
        return self.home / KNOWN_HOSTS_FILE


@dataclass(frozen=True)
class RefChange:
    """One ref to move on the server: from ``old`` (None: absent) to ``new`` (None: delete)."""

    ref: str
    old: str | None
    new: str | None


class PushRejected(TransportError):
    """The server rejected a push: a ref moved since the fetch, or a server rule forbids it."""


class RemoteRepository:
    """The external repository, reached from the mirror with stock git over OpenSSH."""

    def __init__(self, mirror: GitRepo, url: str, ssh: str) -> None:
        self.mirror = mirror
        self.url = url
        self.env = {"GIT_SSH_COMMAND": ssh}

    def branch_tip(self, branch: str) -> str | None:
        """Return the commit of ``branch`` on the server (None when it does not exist)."""
        # --heads sends the ref prefix refs/heads/, so the server lists only branches.
        out = self._run("ls-remote", "--heads", self.url, f"refs/heads/{branch}")
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            if ref == f"refs/heads/{branch}":
                return sha
        return None

    def fetch(self, refspecs: Sequence[str], *, prune: bool = False) -> None:
        """Fetch ``refspecs`` into the mirror; with ``prune``, drop refs the server lost."""
        if not refspecs:
            return
        args = ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"]
        if prune:
            args.append("--prune")
        self._run(*args, self.url, *refspecs)

    def push(self, changes: Sequence[RefChange]) -> None:
        """Move every ref of ``changes`` in one atomic push, each only from its ``old`` value.

        Raises PushRejected when the server refused it (nothing moved) and TransportError when
        the server could not be reached.
        """
        leases = [f"--force-with-lease={change.ref}:{change.old or ''}" for change in changes]
        refspecs = [f"{change.new or ''}:{change.ref}" for change in changes]
        result = self.mirror.execute(
            "push", "--porcelain", "--atomic", *leases, self.url, *refspecs, env=self.env
        )
        if result.returncode == 0:
            return
        output = (result.stdout + result.stderr).decode(errors="replace")
        if any(marker in output for marker in _REJECTED_MARKERS):
            raise PushRejected(_summary(output))
        raise TransportError(f"git push to {self.url} failed: {_summary(output)}")

    def _run(self, *args: str) -> str:
        try:
            return self.mirror.text(*args, env=self.env)
        except GitError as error:
            raise TransportError(
                f"git {args[0]} from {self.url} failed: {_summary(error.stderr)}"
            ) from error


@dataclass
class SyncReport:
    """The outcome of one sync."""

    fetched: str = "nothing"
    """``all`` (everything under refs/tinkops/), ``active`` (queued workflows) or ``nothing``."""
    created: tuple[str, ...] = ()
    ended: dict[str, State] = field(default_factory=dict)
    invalid: list[InvalidEvent] = field(default_factory=list)
    pushed: int = 0
    """The number of refs moved on the server."""
    attempts: int = 0
    """Push attempts: 1 when the first push landed, more after lost races."""


class RemoteReconciler:
    """Keeps the mirror of one remote repository and reconciles it; ``sync`` runs one poll."""

    def __init__(
        self,
        settings: RemoteSettings,
        *,
        remote: RemoteRepository | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.main_ref = f"refs/heads/{settings.branch}"
        if not (settings.mirror / "HEAD").exists():
            init_bare(settings.mirror, settings.branch)
        # Supervision events and status commits are signed with the reconciler's key.
        self.mirror = GitRepo(settings.mirror, signing_key=settings.key.resolve())
        self.remote = remote or RemoteRepository(
            self.mirror, settings.url, ssh_command(settings.key.resolve(), settings.known_hosts)
        )
        self.reconciler = Reconciler(
            self.mirror,
            settings.branch,
            timeout_grace=settings.timeout_grace,
            require_signed_events=settings.require_signed_events,
        )
        self.reconciler_keys = (public_key_of(settings.key),)
        self._sleep = sleep
        self._seen_main: str | None = None
        self._full_sync_due = 0.0
        self._next_deadline: float | None = None
        self._verified: dict[str, str] = {}
        """The last commit known valid of each workflow, by id."""
        self._baseline_taken = False
        self._signers: tuple[str, AllowedSigners] | None = None

    def sync(self) -> SyncReport:
        """Check the server once; fetch, reconcile and push only when something changed."""
        main = self.remote.branch_tip(self.settings.branch)
        if main is None:
            raise TransportError(
                f"branch {self.settings.branch!r} not found on {self.settings.url}; push the "
                "infrastructure repository there first"
            )
        full = main != self._seen_main or time.monotonic() >= self._full_sync_due
        if not full:
            active = self._fetch_active()
            if active is None:
                full = True
            else:
                deadline_due = self._next_deadline is not None and time.time() >= (
                    self._next_deadline
                )
                if not active and not deadline_due:
                    return SyncReport()
        report = self._sync(main, full)
        self._seen_main = main
        return report

    def _fetch_active(self) -> set[str] | None:
        """Fetch the queue, the status and the queued workflows; return the refs that moved.

        Returns None when a full fetch is needed instead: the queue changed on the server
        (only the reconciler writes it) or a queued workflow's ref is gone.
        """
        before = self.mirror.refs(TINKOPS_PREFIX)
        queue = {ref: sha for ref, sha in before.items() if ref.startswith(QUEUE_REF_PREFIX)}
        if not queue and self._next_deadline is None:
            return set()
        queued = sorted({ref.rsplit("/", 1)[1] for ref in queue})
        refspecs = [
            f"+{QUEUE_REF_PREFIX}*:{QUEUE_REF_PREFIX}*",
            # A pattern, because a fetch that names a missing ref fails as a whole.
            f"+{STATUS_REF}*:{STATUS_REF}*",
            *(f"+{workflow_ref(wid)}:{workflow_ref(wid)}" for wid in queued),
        ]
        try:
            self.remote.fetch(refspecs, prune=True)
        except TransportError as error:
            if _MISSING_REF_MARKER in str(error):
                return None
            raise
        after = self.mirror.refs(TINKOPS_PREFIX)
        if {r: s for r, s in after.items() if r.startswith(QUEUE_REF_PREFIX)} != queue:
            return None
        return {ref for ref in set(before) | set(after) if before.get(ref) != after.get(ref)}

    def _fetch_all(self) -> None:
        self.remote.fetch(
            [f"+{self.main_ref}:{self.main_ref}", f"+{TINKOPS_PREFIX}*:{TINKOPS_PREFIX}*"],
            prune=True,
        )
        self.reconciler.forget_refs()

    def _sync(self, main: str, full: bool) -> SyncReport:
        report = SyncReport(fetched="all" if full else "active")
        for attempt in range(1, self.settings.max_push_attempts + 1):
            if full:
                self._fetch_all()
            before = self.mirror.refs(TINKOPS_PREFIX)
            report.invalid += self._verify(before, main)
            result = self.reconciler.reconcile()
            changes = _changes(before, self.mirror.refs(TINKOPS_PREFIX))
            if not changes:
                self._finish(report, result, full)
                return report
            report.attempts = attempt
            try:
                self.remote.push(changes)
            except PushRejected as error:
                delay = random.uniform(0.05, min(2.0, 0.2 * 2**attempt))
                log.info(
                    "push of %d ref(s) to %s lost a race (attempt %d of %d: %s); fetching "
                    "again in %.2f s",
                    len(changes),
                    self.settings.url,
                    attempt,
                    self.settings.max_push_attempts,
                    error,
                    delay,
                )
                self._sleep(delay)
                full = True
                continue
            report.pushed = len(changes)
            self._finish(report, result, full)
            return report
        raise TransportError(
            f"pushing to {self.settings.url} failed {self.settings.max_push_attempts} times "
            "because refs kept moving; retrying on the next poll"
        )

    def _finish(self, report: SyncReport, result: PassResult, full: bool) -> None:
        report.created = result.created
        report.ended = dict(result.ended)
        self._next_deadline = result.next_deadline
        if result.ended:
            # The supervisor removes an ended workflow's queue refs on the pass after.
            self._next_deadline = time.time()
        if full:
            self._full_sync_due = time.monotonic() + self.settings.full_sync_interval
        for workflow_id in result.created:
            log.info("workflow %s created on %s", workflow_id, self.settings.url)
        for workflow_id, state in result.ended.items():
            log.info("workflow %s ended %s on %s", workflow_id, state.value, self.settings.url)

    # --- signatures -------------------------------------------------------------------------

    def _verify(self, refs: dict[str, str], main: str) -> list[InvalidEvent]:
        """Check the workflow refs that moved since they were last checked; reset bad ones."""
        if not self.settings.require_signed_events:
            return []
        tips = {
            ref.removeprefix(WORKFLOW_REF_PREFIX): sha
            for ref, sha in refs.items()
            if ref.startswith(WORKFLOW_REF_PREFIX)
        }
        if not self._baseline_taken:
            # NOTE: workflows that finished before this reconciler first synced are taken as
            # they are; only queued ones are checked from their first event.
            queued = {ref.rsplit("/", 1)[1] for ref in refs if ref.startswith(QUEUE_REF_PREFIX)}
            self._verified.update({wid: tip for wid, tip in tips.items() if wid not in queued})
            self._baseline_taken = True
        moved = {wid: tip for wid, tip in tips.items() if self._verified.get(wid) != tip}
        if not moved:
            return []
        verifier = EventVerifier(
            self.mirror, self._signers_at(main), self.settings.home / SCRATCH_DIR
        )
        invalid = []
        try:
            for workflow_id, tip in sorted(moved.items()):
                known = self._verified.get(workflow_id)
                since = known if known and self.mirror.is_ancestor(known, tip) else None
                verdict = verifier.verify_ref(workflow_id, tip, since)
                if verdict.invalid is not None:
                    self._quarantine(verdict.invalid, tip, verdict.last_valid)
                    invalid.append(verdict.invalid)
                self._verified[workflow_id] = verdict.last_valid
        finally:
            verifier.close()
        return invalid

    def _signers_at(self, main: str) -> AllowedSigners:
        if self._signers is None or self._signers[0] != main:
            self._signers = (main, signers_at(self.mirror, main, self.reconciler_keys))
        return self._signers[1]

    def _quarantine(self, invalid: InvalidEvent, tip: str, last_valid: str) -> None:
        """Reset the workflow ref to ``last_valid``; keep the rejected history on its own ref."""
        rejected = f"{REJECTED_REF_PREFIX}{invalid.workflow}/{invalid.commit}"
        self.mirror.run("update-ref", rejected, tip)
        if not self.mirror.update_ref(workflow_ref(invalid.workflow), last_valid, tip):
            raise TransportError(f"workflow {invalid.workflow} moved in the mirror during a sync")
        self.reconciler.invalid_events.setdefault(invalid.workflow, []).append(str(invalid))
        log.warning(
            "workflow %s: %s; ignored, the workflow is reset to %s and the rejected commits "
            "are kept on %s",
            invalid.workflow,
            invalid,
            last_valid[:12],
            rejected,
        )

    # --- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Sync every ``poll_interval`` seconds (sooner for a due global timeout) until ``stop``."""
        log.info(
            "remote reconciler started for %s (poll every %.1f s, mirror %s)",
            self.settings.url,
            self.settings.poll_interval,
            self.settings.mirror,
        )
        failures = 0
        while not stop.is_set():
            try:
                report = self.sync()
                failures = 0
                if report.pushed or report.invalid:
                    log.info(
                        "synced %s: %d ref(s) pushed in %d attempt(s), %d invalid event(s)",
                        self.settings.url,
                        report.pushed,
                        report.attempts,
                        len(report.invalid),
                    )
            except (TransportError, GitError) as error:
                failures += 1
                log.warning(
                    "sync with %s failed (%d in a row): %s", self.settings.url, failures, error
                )
            stop.wait(self._wait_time(failures))
        log.info("remote reconciler stopped")

    def _wait_time(self, failures: int) -> float:
        wait = self.settings.poll_interval * random.uniform(0.9, 1.1)
        if failures:
            wait = min(wait * 2 ** min(failures, 5), max(self.settings.poll_interval, 300.0))
        if self._next_deadline is not None:
            wait = max(0.0, min(wait, self._next_deadline - time.time()))
        return wait


def prepare_remote(
    settings: RemoteSettings,
    *,
    host_key: str | None = None,
    host_key_fingerprint: str | None = None,
    trust_on_first_use: bool = False,
) -> None:
    """Create the home folder and pin the server's host key in its known_hosts file.

    With none of the three sources, a known_hosts file pinned earlier is used as it is.
    """
    try:
        endpoint = Endpoint.parse(settings.url)
    except ValueError as error:
        raise ConfigError(f"{error}; remote mode needs an ssh:// URL") from error
    if not settings.key.is_file():
        raise ConfigError(f"--key {settings.key} is not a file; pass the reconciler's SSH key")
    settings.home.mkdir(parents=True, exist_ok=True)
    if not (host_key or host_key_fingerprint or trust_on_first_use):
        if settings.known_hosts.is_file():
            return
        raise ConfigError(
            f"no host key pinned for {endpoint.host}:{endpoint.port}; pass --host-key, "
            "--host-key-fingerprint or --trust-on-first-use"
        )
    try:
        pin_host_key(
            endpoint,
            settings.known_hosts,
            host_key=host_key,
            host_key_fingerprint=host_key_fingerprint,
            trust_on_first_use=trust_on_first_use,
        )
    except HostKeyError as error:
        raise ConfigError(str(error)) from error
    except OSError as error:
        raise TransportError(
            f"cannot reach {endpoint.host}:{endpoint.port} to read its host key: {error}"
        ) from error


def _changes(before: dict[str, str], after: dict[str, str]) -> list[RefChange]:
    refs: Iterable[str] = sorted(set(before) | set(after))
    return [
        RefChange(ref, before.get(ref), after.get(ref))
        for ref in refs
        if before.get(ref) != after.get(ref)
    ]


def _summary(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])
