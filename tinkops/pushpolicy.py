"""Push authorization: which ref updates an operator or a worker may make.

``check_push`` reads the repository and returns every rejection with its reason. It changes
nothing. Inside the pre-receive hook, the objects it reads include the pushed ones that wait
in quarantine. The rules:

- Operators push branches (``refs/heads/*``) only. The main branch moves by fast-forward
  only, unless ``allow_force_push_main`` is set, and is never deleted. ``refs/tinkops/*``
  belongs to the provisioner and its workers.
- Workers only append to existing ``refs/tinkops/workflows/<id>`` refs of workflows that
  have a task for them, by fast-forward. Each new commit has one parent, leaves
  ``workflow.yaml`` untouched, changes only ``state.json`` and ``ephemeral/``, contains a valid
  ``state.json`` and records one event of an action that this worker runs, and changes the state
  of that action only. In every new commit, the files under ``ephemeral/`` total at most
  10 MiB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tinkops import yamltext
from tinkops.errors import Problem
from tinkops.identities import Principal, Role
from tinkops_agent.gitrepo import ZERO_SHA, GitError, GitRepo
from tinkops_agent.protocol import (
    EPHEMERAL_DIR,
    STATE_FILE,
    WORKFLOW_FILE,
    WORKFLOW_ID_PATTERN,
    WORKFLOW_REF_PREFIX,
    Event,
    EventKind,
    ProtocolError,
    Workflow,
    WorkflowStatus,
    canonical_worker,
    parse_event_message,
)

EPHEMERAL_LIMIT = 10 * 1024 * 1024
"""The maximum total size in bytes of a workflow's files under ``ephemeral/``."""

MAX_COMMITS_PER_UPDATE = 1000
"""The maximum number of new commits one worker ref update may carry."""
# NOTE: 1000 is an estimate. A workflow records a few events per action, so an agent that was
# offline for a long time stays far below it, while a runaway push is cut short.

BRANCH_PREFIX = "refs/heads/"
TINKOPS_PREFIX = "refs/tinkops/"

# Git tree entry modes: regular files are 100644 or 100755, symlinks 120000, submodules 160000.
_REGULAR_FILE_MODES = ("100644", "100755")


@dataclass(frozen=True)
class RefUpdate:
    """One line of the pre-receive hook's input: ``<old> <new> <ref>``."""

    old: str
    new: str
    ref: str

    @property
    def creates(self) -> bool:
        return self.old == ZERO_SHA

    @property
    def deletes(self) -> bool:
        return self.new == ZERO_SHA


@dataclass(frozen=True)
class Rejection:
    """A ref update the policy does not allow, and why."""

    ref: str
    reason: str

    def __str__(self) -> str:
        return f"rejected {self.ref}: {self.reason}"


def parse_updates(lines: Iterable[str]) -> list[RefUpdate]:
    """Parse the pre-receive hook's input lines. Raises ValueError on a malformed line."""
    updates = []
    for line in lines:
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"expected '<old> <new> <ref>', got {line.strip()!r}")
        updates.append(RefUpdate(old=fields[0], new=fields[1], ref=fields[2]))
    return updates


def check_push(
    principal: Principal,
    repo: GitRepo,
    updates: Sequence[RefUpdate],
    *,
    main_branch: str = "main",
    allow_force_push_main: bool = False,
    ephemeral_limit: int = EPHEMERAL_LIMIT,
    max_commits: int = MAX_COMMITS_PER_UPDATE,
) -> list[Rejection]:
    """Return every rejection among ``updates`` pushed by ``principal`` (empty: allowed).

    ``allow_force_push_main`` lets operators move the main branch to a commit that does not
    contain its current tip (a force push). Nobody may delete the main branch.
    """
    rejections: list[Rejection] = []
    for update in updates:
        if principal.role is Role.OPERATOR:
            reasons = _check_operator_update(
                repo, update, BRANCH_PREFIX + main_branch, allow_force_push_main
            )
        else:
            checker = _WorkerUpdateChecker(principal, repo, ephemeral_limit, max_commits)
            reasons = checker.check(update)
        rejections.extend(Rejection(update.ref, reason) for reason in reasons)
    return rejections


# --- operators ------------------------------------------------------------------------------


def _check_operator_update(
    repo: GitRepo, update: RefUpdate, main_ref: str, allow_force_push_main: bool
) -> list[str]:
    if update.ref.startswith(TINKOPS_PREFIX):
        return [
            "refs/tinkops/ is written only by the provisioner and its workers; "
            "change workflows through requests on the main branch"
        ]
    if not update.ref.startswith(BRANCH_PREFIX):
        return ["operators may push only branches (refs/heads/*)"]
    if update.ref != main_ref:
        return []

    if update.deletes:
        return [f"the main branch {main_ref} cannot be deleted"]
    if allow_force_push_main or update.creates:
        return []
    if not repo.is_ancestor(update.old, update.new):
        return [
            f"{main_ref} moves only by fast-forward, and {_short(update.new)} does not contain "
            f"{_short(update.old)}; fetch, rebase or merge, and push again"
        ]
    return []


# --- workers --------------------------------------------------------------------------------


class _WorkerUpdateChecker:
    """The checks of one worker ref update. Each step returns reasons, empty when it passes."""

    def __init__(
        self, principal: Principal, repo: GitRepo, ephemeral_limit: int, max_commits: int
    ) -> None:
        self.repo = repo
        self.worker_ids = frozenset(canonical_worker(item) for item in principal.worker_ids)
        self.ephemeral_limit = ephemeral_limit
        self.max_commits = max_commits

    def check(self, update: RefUpdate) -> list[str]:
        workflow_id = update.ref.removeprefix(WORKFLOW_REF_PREFIX)
        if not update.ref.startswith(WORKFLOW_REF_PREFIX):
            return [f"workers may push only to {WORKFLOW_REF_PREFIX}<id>"]
        if not WORKFLOW_ID_PATTERN.match(workflow_id):
            return [f"{workflow_id!r} is not a workflow id"]
        if update.creates:
            return ["workers cannot create workflow refs; the provisioner creates them"]
        if update.deletes:
            return ["workers cannot delete workflow refs"]

        workflow, reasons = self._load_workflow(update.old)
        if workflow is None:
            return reasons
        assigned = {canonical_worker(task.worker) for task in workflow.tasks}
        if not assigned & self.worker_ids:
            return [
                f"workflow {workflow_id} has no task for {_listing(self.worker_ids)} "
                f"(its workers: {_listing(assigned)})"
            ]

        if not self.repo.is_ancestor(update.old, update.new):
            return [
                f"non-fast-forward: {_short(update.new)} does not contain "
                f"{_short(update.old)}; fetch the workflow ref, re-apply the event "
                "and push again"
            ]
        return self._check_commits(workflow, update)

    def _load_workflow(self, commit: str) -> tuple[Workflow | None, list[str]]:
        data = self.repo.read_file(commit, WORKFLOW_FILE)
        if data is None:
            return None, [f"{_short(commit)} has no {WORKFLOW_FILE}"]
        problems: list[Problem] = []
        document = yamltext.load(WORKFLOW_FILE, data, problems)
        if document is None:
            return None, [str(problem) for problem in problems]
        if not isinstance(document.value, dict):
            return None, [f"{WORKFLOW_FILE} at {_short(commit)} is not a mapping"]
        try:
            return Workflow.from_dict(document.value), []
        except ProtocolError as error:
            return None, [f"{WORKFLOW_FILE} at {_short(commit)}: {error}"]

    def _check_commits(self, workflow: Workflow, update: RefUpdate) -> list[str]:
        span = f"{update.old}..{update.new}"
        count = int(self.repo.text("rev-list", "--count", span).strip())
        if count > self.max_commits:
            return [
                f"the push adds {count} commits, over the limit of {self.max_commits} "
                "per workflow; push events as they happen"
            ]

        # The commits are read as raw objects, because a message is the pusher's text and may
        # contain any byte, including the separators of formatted ``git log`` output.
        history = [
            line.split()
            for line in self.repo.text("rev-list", "--reverse", "--parents", span).splitlines()
        ]
        objects = self.repo.read_blobs([commit for commit, *_parents in history])
        reasons: list[str] = []
        for commit, *parents in history:
            if len(parents) != 1:
                reasons.append(
                    f"commit {_short(commit)} has {len(parents)} parents; "
                    "workflow history is linear, one event per commit"
                )
                continue
            message, problem = _commit_message(objects[commit])
            if problem:
                reasons.append(f"commit {_short(commit)}: the message {problem}")
                continue
            reasons += self._check_commit(workflow, parents[0], commit, message)
        return reasons

    def _check_commit(
        self, workflow: Workflow, parent: str, commit: str, message: str
    ) -> list[str]:
        reasons = self._check_changed_paths(parent, commit)
        # Every commit stays in the workflow's history, so the limit applies to each one, not
        # only to the tip: otherwise a push could carry any amount that a later commit drops.
        reasons += self._check_ephemeral(commit)
        status, state_reasons = self._load_state(workflow, commit)
        event, event_reasons = self._check_event(workflow, commit, message)
        reasons += state_reasons + event_reasons
        if status is None or event is None:
            return reasons

        previous, _ = self._load_state(workflow, parent)
        if previous is not None:
            reasons += _check_state_change(previous, status, event.action_index, commit)
        return reasons

    def _check_changed_paths(self, parent: str, commit: str) -> list[str]:
        reasons = []
        for _status, path in self.repo.changed_files(parent, commit):
            if path == WORKFLOW_FILE:
                reasons.append(
                    f"commit {_short(commit)} changes {WORKFLOW_FILE}, "
                    "which is immutable once rendered"
                )
            elif path != STATE_FILE and not path.startswith(EPHEMERAL_DIR + "/"):
                reasons.append(
                    f"commit {_short(commit)} changes {path!r}; workers may change only "
                    f"{STATE_FILE} and files under {EPHEMERAL_DIR}/"
                )
        return reasons

    def _load_state(
        self, workflow: Workflow, commit: str
    ) -> tuple[WorkflowStatus | None, list[str]]:
        data = self.repo.read_file(commit, STATE_FILE)
        if data is None:
            return None, [f"commit {_short(commit)} has no {STATE_FILE}"]
        try:
            status = WorkflowStatus.from_json(data)
        except (ProtocolError, RecursionError) as error:
            return None, [f"commit {_short(commit)}: {STATE_FILE} is invalid: {error}"]
        if status.workflow != workflow.id:
            return None, [
                f"commit {_short(commit)}: {STATE_FILE} names workflow {status.workflow!r}, "
                f"not {workflow.id!r}"
            ]
        if len(status.actions) != len(workflow.flat_actions()):
            return None, [
                f"commit {_short(commit)}: {STATE_FILE} lists {len(status.actions)} actions, "
                f"but the workflow has {len(workflow.flat_actions())}"
            ]
        return status, []

    def _check_event(
        self, workflow: Workflow, commit: str, message: str
    ) -> tuple[Event | None, list[str]]:
        """Check that the commit records one event of an action that this worker runs."""
        where = f"commit {_short(commit)}"
        try:
            event = parse_event_message(message)
        except ProtocolError as error:
            return None, [f"{where}: {error}"]
        if event is None:
            return None, [
                f"{where} carries no event trailers (Tinkops-Event, Workflow, Worker, ...)"
            ]

        if event.workflow != workflow.id:
            return None, [
                f"{where} records an event of workflow {event.workflow!r}, not {workflow.id!r}"
            ]
        worker = canonical_worker(event.worker)
        if worker not in self.worker_ids:
            return None, [
                f"{where} has Worker: {event.worker!r}, but this key acts only as "
                f"{_listing(self.worker_ids)}"
            ]
        if event.kind is EventKind.WORKFLOW:
            return None, [
                f"{where} records a workflow event; workers record only their actions' events"
            ]

        actions = workflow.flat_actions()
        if not 0 <= event.action_index < len(actions):
            return None, [
                f"{where} has Action-Index {event.action_index}, but the workflow has "
                f"actions 0..{len(actions) - 1}"
            ]
        task, action = actions[event.action_index]
        if canonical_worker(task.worker) != worker:
            return None, [
                f"{where}: action {event.action_index} ({task.name}/{action.name}) runs on "
                f"{canonical_worker(task.worker)}, not on {worker}"
            ]
        if (event.task, event.action) != (task.name, action.name):
            return None, [
                f"{where} names {event.task}/{event.action}, but action "
                f"{event.action_index} is {task.name}/{action.name}"
            ]
        return event, []

    def _check_ephemeral(self, commit: str) -> list[str]:
        try:
            listing = self.repo.run("ls-tree", "-r", "-l", "-z", commit, "--", EPHEMERAL_DIR + "/")
        except GitError as error:
            return [f"cannot list {EPHEMERAL_DIR}/ at {_short(commit)}: {error.stderr}"]
        reasons: list[str] = []
        total = 0
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, raw_path = entry.partition(b"\t")
            mode, _kind, _sha, size = meta.decode().split()
            path = raw_path.decode(errors="replace")
            if mode not in _REGULAR_FILE_MODES:
                reasons.append(
                    f"{path!r} at {_short(commit)} is not a regular file (mode {mode}); "
                    "ephemeral data holds only plain files"
                )
                continue
            total += int(size)
        if total > self.ephemeral_limit:
            reasons.append(
                f"ephemeral data at {_short(commit)} is {total} bytes, over the limit of "
                f"{self.ephemeral_limit} bytes; remove or shrink files under {EPHEMERAL_DIR}/"
            )
        return reasons


def _check_state_change(
    previous: WorkflowStatus, status: WorkflowStatus, action_index: int, commit: str
) -> list[str]:
    """Check that an event commit changes the state of no action but its own.

    The workflow-level fields (state, started_at, updated_at) follow from the action's change,
    so they may differ. Another action's entry may not, because only its own worker reports it.
    """
    reasons = []
    for index, (before, after) in enumerate(zip(previous.actions, status.actions, strict=True)):
        if index == action_index:
            identity_changed = (before.task, before.name, before.worker) != (
                after.task,
                after.name,
                after.worker,
            )
            if identity_changed:
                reasons.append(
                    f"commit {_short(commit)}: {STATE_FILE} renames action {index} or moves it "
                    "to another worker"
                )
        elif before != after:
            reasons.append(
                f"commit {_short(commit)}: {STATE_FILE} changes action {index} "
                f"({after.task}/{after.name}), but the event records action {action_index}"
            )
    return reasons


def _commit_message(raw: bytes) -> tuple[str, str]:
    """Return the message of a raw commit object, and what is wrong with it (empty if fine).

    Messages must be UTF-8 without NUL or 0x1E bytes, because the provisioner and the agents
    read workflow history through ``git log`` output that uses those bytes as separators.
    """
    _headers, _, body = raw.partition(b"\n\n")
    if b"\0" in body or b"\x1e" in body:
        return "", "contains a NUL or 0x1E byte"
    try:
        return body.decode("utf-8"), ""
    except UnicodeDecodeError as error:
        return "", f"is not UTF-8 ({error.reason} at byte {error.start})"


def _short(sha: str) -> str:
    return sha[:12]


def _listing(ids: Iterable[str]) -> str:
    return ", ".join(sorted(ids)) or "no worker"
