"""The push policy, on real repositories written by the reconciler's and the agent's own code.

Most tests call ``check_push`` directly with the objects already in the repository. The hook
tests at the end push through a real receive-pack, so there the policy reads quarantined objects.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tinkops.audit import Decision, Stage, read_records
from tinkops.identities import Principal, Role, principal_environment
from tinkops.prereceive import HookSettings, install_hooks, main_branch, run_hook
from tinkops.pushpolicy import EPHEMERAL_LIMIT, RefUpdate, Rejection, check_push, parse_updates
from tinkops.workflows import write_workflow_commit
from tinkops_agent.eventlog import append_event
from tinkops_agent.gitrepo import ZERO_SHA, GitRepo, Identity, TreeEntry, init_bare
from tinkops_agent.protocol import (
    STATE_FILE,
    WORKFLOW_FILE,
    Action,
    Event,
    EventKind,
    State,
    Task,
    Workflow,
    WorkflowStatus,
    apply_action_event,
    workflow_ref,
)

WORKER_A = "08:00:27:00:00:01"
WORKER_B = "08:00:27:00:00:02"
AGENT = Identity("tinkops agent", "agent@example.test")
AT = "2024-05-01T12:00:00Z"

OPERATOR = Principal(Role.OPERATOR, "alice", "SHA256:operator")
NODE_A = Principal(Role.WORKER, "node-a", "SHA256:node-a", (WORKER_A,))
NODE_B = Principal(Role.WORKER, "node-b", "SHA256:node-b", (WORKER_B,))


def workflow(workflow_id: str, *workers: str) -> Workflow:
    tasks = tuple(
        Task(
            name=f"task-{index}",
            worker=worker,
            actions=(
                Action(name="wipe", image="busybox", timeout=60),
                Action(name="install", image="busybox", timeout=60),
            ),
        )
        for index, worker in enumerate(workers)
    )
    return Workflow(id=workflow_id, template="demo", tasks=tasks, request=f"{workflow_id}.yaml")


# wf-a runs actions 0 and 1 on worker A, then 2 and 3 on worker B; wf-b runs only on worker B.
WORKFLOWS = {
    "wf-a": workflow("wf-a", WORKER_A, WORKER_B),
    "wf-b": workflow("wf-b", WORKER_B),
}


@dataclass
class Scene:
    repo: GitRepo
    main: str
    first: dict[str, str]

    def event(
        self,
        workflow_id: str,
        index: int,
        *,
        parent: str | None = None,
        worker: str | None = None,
        state: State = State.RUNNING,
        kind: EventKind = EventKind.ACTION,
        ephemeral: dict[str, bytes] | None = None,
    ) -> str:
        """Write the commit an agent writes for one action event, as the agent's code does."""
        parent = parent or self.first[workflow_id]
        definition = WORKFLOWS[workflow_id]
        previous = WorkflowStatus.from_json(self.repo.read_file(parent, STATE_FILE) or b"")
        status = apply_action_event(previous, index, state, at=AT)
        task, action = definition.flat_actions()[index]
        event = Event(
            kind=kind,
            workflow=workflow_id,
            workflow_state=status.state,
            worker=worker or task.worker,
            message=f"{action.name} {state.value}",
            event_id=f"event-{index}-{state.value}",
            created_at=AT,
            task=task.name,
            action=action.name,
            action_index=index,
            action_state=state,
        )
        return append_event(self.repo, parent, status, event, AGENT, ephemeral)

    def rewrite(
        self,
        commit: str,
        replacements: dict[str, TreeEntry | None] | None = None,
        *,
        parents: list[str] | None = None,
        message: str | None = None,
    ) -> str:
        """Copy ``commit`` with files replaced, other parents or another message."""
        tree = self.repo.write_root(commit, replacements or {})
        if parents is None:
            parents = self.repo.text("log", "-1", "--format=%P", commit).split()
        if message is None:
            message = self.repo.text("log", "-1", "--format=%B", commit)
        return self.repo.commit_tree(tree, parents, message, AGENT)

    def blob(self, data: bytes) -> TreeEntry:
        return TreeEntry("100644", "blob", self.repo.write_blob(data))

    def update(self, workflow_id: str, new: str, old: str | None = None) -> RefUpdate:
        return RefUpdate(old or self.first[workflow_id], new, workflow_ref(workflow_id))


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    repo = init_bare(tmp_path / "tinkops.git", "main")
    tree = repo.write_tree({"README.md": b"infrastructure\n"})
    main = repo.commit_tree(tree, [], "Start\n", AGENT)
    repo.update_ref("refs/heads/main", main, None)
    first = {}
    for workflow_id, definition in WORKFLOWS.items():
        first[workflow_id] = write_workflow_commit(repo, definition)
        repo.update_ref(workflow_ref(workflow_id), first[workflow_id], None)
    return Scene(repo, main, first)


def reasons(scene: Scene, principal: Principal, *updates: RefUpdate) -> str:
    return "\n".join(str(r) for r in check_push(principal, scene.repo, list(updates)))


# --- workers: allowed -----------------------------------------------------------------------


def test_worker_event_on_own_workflow_allowed(scene: Scene) -> None:
    commit = scene.event("wf-a", 0)

    assert check_push(NODE_A, scene.repo, [scene.update("wf-a", commit)]) == []


def test_worker_several_events_and_ephemeral_allowed(scene: Scene) -> None:
    running = scene.event("wf-a", 0)
    success = scene.event(
        "wf-a", 0, parent=running, state=State.SUCCESS, ephemeral={"data": b"{}", "disk": b"x"}
    )
    handler = scene.event("wf-a", 1, parent=success, kind=EventKind.HANDLER)

    assert check_push(NODE_A, scene.repo, [scene.update("wf-a", handler)]) == []


def test_next_worker_continues_workflow(scene: Scene) -> None:
    done = scene.event("wf-a", 1, parent=scene.event("wf-a", 0, state=State.SUCCESS))
    done = scene.event("wf-a", 1, parent=done, state=State.SUCCESS)
    scene.repo.update_ref(workflow_ref("wf-a"), done, scene.first["wf-a"])
    started = scene.event("wf-a", 2, parent=done)

    assert check_push(NODE_B, scene.repo, [scene.update("wf-a", started, done)]) == []


def test_worker_ids_compared_canonically(scene: Scene) -> None:
    commit = scene.event("wf-a", 0, worker="08-00-27-00-00-01")
    principal = Principal(Role.WORKER, "node-a", "SHA256:node-a", ("08:00:27:00:00:01",))

    assert check_push(principal, scene.repo, [scene.update("wf-a", commit)]) == []


def test_ephemeral_limit_is_inclusive(scene: Scene) -> None:
    half = EPHEMERAL_LIMIT // 2
    at_limit = scene.event("wf-a", 0, ephemeral={"a": b"a" * half, "b": b"b" * half})
    over = scene.event("wf-a", 0, ephemeral={"a": b"a" * half, "b": b"b" * half, "c": b"c"})

    assert check_push(NODE_A, scene.repo, [scene.update("wf-a", at_limit)]) == []
    assert "over the limit of 10485760 bytes" in reasons(scene, NODE_A, scene.update("wf-a", over))


def test_ephemeral_limit_checked_per_commit(scene: Scene) -> None:
    # The first commit carries 11 MiB that the second drops: the tip is small, but the history
    # that the repository keeps is not.
    big = scene.event("wf-a", 0, ephemeral={"disk.img": b"x" * (EPHEMERAL_LIMIT + 1)})
    dropped = scene.event("wf-a", 0, parent=big, state=State.SUCCESS, ephemeral={})

    text = reasons(scene, NODE_A, scene.update("wf-a", dropped))

    assert f"ephemeral data at {big[:12]} is {EPHEMERAL_LIMIT + 1} bytes" in text
    assert dropped[:12] not in text


# --- workers: rejected ----------------------------------------------------------------------


def test_worker_other_workflow_rejected(scene: Scene) -> None:
    commit = scene.event("wf-b", 0)

    rejections = check_push(NODE_A, scene.repo, [scene.update("wf-b", commit)])

    assert rejections == [
        Rejection(
            workflow_ref("wf-b"),
            "workflow wf-b has no task for 08:00:27:00:00:01 (its workers: 08:00:27:00:00:02)",
        )
    ]


def test_worker_main_branch_rejected(scene: Scene) -> None:
    commit = scene.event("wf-a", 0)
    update = RefUpdate(scene.main, commit, "refs/heads/main")

    assert "workers may push only to refs/tinkops/workflows/<id>" in reasons(scene, NODE_A, update)


@pytest.mark.parametrize(
    "ref",
    [
        "refs/heads/feature",
        "refs/tags/v1",
        "refs/tinkops/queue/08-00-27-00-00-01/wf-a",
        "refs/tinkops/status",
        "refs/tinkops/workflows/wf-a/extra",
    ],
)
def test_worker_other_refs_rejected(scene: Scene, ref: str) -> None:
    commit = scene.event("wf-a", 0)
    update = RefUpdate(scene.first["wf-a"], commit, ref)

    assert check_push(NODE_A, scene.repo, [update]) != []


def test_worker_create_and_delete_rejected(scene: Scene) -> None:
    create = RefUpdate(ZERO_SHA, scene.first["wf-a"], workflow_ref("wf-new"))
    delete = RefUpdate(scene.first["wf-a"], ZERO_SHA, workflow_ref("wf-a"))

    text = reasons(scene, NODE_A, create, delete)

    assert "workers cannot create workflow refs" in text
    assert "workers cannot delete workflow refs" in text


def test_worker_non_fast_forward_rejected(scene: Scene) -> None:
    pushed = scene.event("wf-a", 0)
    sibling = scene.event("wf-a", 0, state=State.FAILED)

    text = reasons(scene, NODE_A, scene.update("wf-a", sibling, pushed))

    assert "non-fast-forward" in text


def test_worker_workflow_change_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    tampered = scene.rewrite(event, {WORKFLOW_FILE: scene.blob(b"id: wf-a\ntasks: []\n")})
    removed = scene.rewrite(event, {WORKFLOW_FILE: None})

    assert "changes workflow.yaml" in reasons(scene, NODE_A, scene.update("wf-a", tampered))
    assert "changes workflow.yaml" in reasons(scene, NODE_A, scene.update("wf-a", removed))


def test_worker_other_file_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    extra = scene.rewrite(event, {"notes.txt": scene.blob(b"hello\n")})

    text = reasons(scene, NODE_A, scene.update("wf-a", extra))

    assert "changes 'notes.txt'" in text


def test_worker_forged_worker_trailer_rejected(scene: Scene) -> None:
    # Worker A's key, an event that claims worker B ran B's action.
    forged = scene.event("wf-a", 2, worker=WORKER_B)

    text = reasons(scene, NODE_A, scene.update("wf-a", forged))

    assert "has Worker: '08:00:27:00:00:02', but this key acts only as 08:00:27:00:00:01" in text


def test_worker_other_workers_action_rejected(scene: Scene) -> None:
    # The trailer names worker A, but action 2 belongs to worker B's task.
    event = scene.event("wf-a", 2, worker=WORKER_A)

    text = reasons(scene, NODE_A, scene.update("wf-a", event))

    assert "action 2 (task-1/wipe) runs on 08:00:27:00:00:02, not on 08:00:27:00:00:01" in text


def test_worker_mismatched_action_name_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    message = scene.repo.text("log", "-1", "--format=%B", event)
    renamed = scene.rewrite(event, message=message.replace("Action: wipe", "Action: install"))

    text = reasons(scene, NODE_A, scene.update("wf-a", renamed))

    assert "names task-0/install, but action 0 is task-0/wipe" in text


def test_worker_state_of_other_action_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    status = WorkflowStatus.from_json(scene.repo.read_file(event, STATE_FILE) or b"")
    skipped = apply_action_event(status, 2, State.SUCCESS, at=AT)
    forged = scene.rewrite(event, {STATE_FILE: scene.blob(skipped.to_json().encode())})

    text = reasons(scene, NODE_A, scene.update("wf-a", forged))

    assert "changes action 2 (task-1/wipe), but the event records action 0" in text


def test_worker_workflow_event_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0, kind=EventKind.WORKFLOW)

    assert "records a workflow event" in reasons(scene, NODE_A, scene.update("wf-a", event))


def test_worker_commit_without_event_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    plain = scene.rewrite(event, message="Just a commit\n")

    text = reasons(scene, NODE_A, scene.update("wf-a", plain))

    assert "carries no event trailers" in text


def test_worker_message_separator_bytes_rejected(scene: Scene) -> None:
    # Formatted git log output separates records with 0x1E, so such a message could split one
    # commit into several for a reader of the workflow history.
    event = scene.event("wf-a", 0)
    subject, _, rest = scene.repo.text("log", "-1", "--format=%B", event).partition("\n")
    odd = scene.rewrite(event, message=f"{subject}\n\nbody \x1e {'0' * 40}\x1e\n{rest}")

    text = reasons(scene, NODE_A, scene.update("wf-a", odd))

    assert "the message contains a NUL or 0x1E byte" in text


def test_worker_non_utf8_message_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    # git commit-tree would re-encode the message, so the raw object is written directly.
    raw = scene.repo.run("cat-file", "commit", event).replace(b"wipe RUNNING", b"wipe \xff")
    commit = scene.repo.text("hash-object", "-t", "commit", "-w", "--stdin", input=raw).strip()

    text = reasons(scene, NODE_A, scene.update("wf-a", commit))

    assert "the message is not UTF-8" in text


def test_worker_invalid_trailers_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    message = scene.repo.text("log", "-1", "--format=%B", event)
    broken = scene.rewrite(
        event, message=message.replace("Tinkops-Event: action", "Tinkops-Event: x")
    )

    assert "event trailers are invalid" in reasons(scene, NODE_A, scene.update("wf-a", broken))


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (b"{not json", "state.json is invalid"),
        (b'{"workflow": "wf-b", "state": "RUNNING", "actions": []}', "names workflow 'wf-b'"),
        (b"[" * 100_000, "state.json is invalid"),
    ],
)
def test_worker_invalid_state_rejected(scene: Scene, state: bytes, expected: str) -> None:
    event = scene.event("wf-a", 0)
    broken = scene.rewrite(event, {STATE_FILE: scene.blob(state)})

    assert expected in reasons(scene, NODE_A, scene.update("wf-a", broken))


def test_worker_merge_commit_rejected(scene: Scene) -> None:
    left = scene.event("wf-a", 0)
    right = scene.event("wf-a", 0, state=State.FAILED)
    merge = scene.rewrite(left, parents=[left, right])

    text = reasons(scene, NODE_A, scene.update("wf-a", merge))

    assert "has 2 parents" in text


def test_worker_ephemeral_symlink_rejected(scene: Scene) -> None:
    event = scene.event("wf-a", 0)
    data = scene.repo.write_blob(b"{}")
    target = scene.repo.write_blob(b"/etc/shadow")
    listing = f"100644 blob {data}\tdata\n120000 blob {target}\tlink\n"
    folder = scene.repo.text("mktree", input=listing.encode()).strip()
    linked = scene.rewrite(event, {"ephemeral": TreeEntry("040000", "tree", folder)})

    text = reasons(scene, NODE_A, scene.update("wf-a", linked))

    assert "'ephemeral/link'" in text
    assert "mode 120000" in text


def test_worker_commit_limit(scene: Scene) -> None:
    commit = scene.event("wf-a", 0)
    commit = scene.event("wf-a", 0, parent=commit, state=State.RUNNING)
    update = scene.update("wf-a", commit)

    rejections = check_push(NODE_A, scene.repo, [update], max_commits=1)

    assert len(rejections) == 1
    assert "adds 2 commits, over the limit of 1" in rejections[0].reason


# --- operators ------------------------------------------------------------------------------


def operator_commit(scene: Scene, parent: str | None, text: bytes) -> str:
    tree = scene.repo.write_tree({"README.md": text})
    return scene.repo.commit_tree(tree, [parent] if parent else [], "Change\n", AGENT)


def test_operator_fast_forward_main_allowed(scene: Scene) -> None:
    commit = operator_commit(scene, scene.main, b"next\n")

    assert (
        check_push(OPERATOR, scene.repo, [RefUpdate(scene.main, commit, "refs/heads/main")]) == []
    )


def test_operator_rewrite_main_rejected(scene: Scene) -> None:
    unrelated = operator_commit(scene, None, b"rewritten\n")

    text = reasons(scene, OPERATOR, RefUpdate(scene.main, unrelated, "refs/heads/main"))

    assert "refs/heads/main moves only by fast-forward" in text


def test_operator_delete_main_rejected(scene: Scene) -> None:
    text = reasons(scene, OPERATOR, RefUpdate(scene.main, ZERO_SHA, "refs/heads/main"))

    assert "cannot be deleted" in text


def test_operator_other_branches_free(scene: Scene) -> None:
    feature = operator_commit(scene, scene.main, b"feature\n")
    unrelated = operator_commit(scene, None, b"unrelated\n")
    updates = [
        RefUpdate(ZERO_SHA, feature, "refs/heads/feature"),
        RefUpdate(feature, unrelated, "refs/heads/feature"),
        RefUpdate(feature, ZERO_SHA, "refs/heads/old"),
        RefUpdate(ZERO_SHA, unrelated, "refs/heads/main-copy"),
    ]

    assert check_push(OPERATOR, scene.repo, updates) == []


def test_operator_force_push_main_configurable(scene: Scene) -> None:
    unrelated = operator_commit(scene, None, b"rewritten\n")
    rewrite = RefUpdate(scene.main, unrelated, "refs/heads/main")
    delete = RefUpdate(scene.main, ZERO_SHA, "refs/heads/main")

    allowed = check_push(OPERATOR, scene.repo, [rewrite], allow_force_push_main=True)
    deleted = check_push(OPERATOR, scene.repo, [delete], allow_force_push_main=True)
    worker = check_push(NODE_A, scene.repo, [rewrite], allow_force_push_main=True)

    assert allowed == []
    assert len(deleted) == 1
    assert "cannot be deleted" in deleted[0].reason
    assert len(worker) == 1


def test_operator_main_branch_configurable(scene: Scene) -> None:
    unrelated = operator_commit(scene, None, b"rewritten\n")
    updates = [RefUpdate(scene.main, unrelated, "refs/heads/main")]

    assert check_push(OPERATOR, scene.repo, updates, main_branch="trunk") == []


@pytest.mark.parametrize(
    "ref", ["refs/tinkops/workflows/wf-a", "refs/tinkops/queue/x/wf-a", "refs/tags/v1"]
)
def test_operator_non_branch_refs_rejected(scene: Scene, ref: str) -> None:
    update = RefUpdate(ZERO_SHA, scene.main, ref)

    assert check_push(OPERATOR, scene.repo, [update]) != []


def test_every_rejected_ref_listed(scene: Scene) -> None:
    good = scene.event("wf-a", 0)
    updates = [
        scene.update("wf-a", good),
        scene.update("wf-b", scene.event("wf-b", 0)),
        RefUpdate(scene.main, good, "refs/heads/main"),
    ]

    rejections = check_push(NODE_A, scene.repo, updates)

    assert [rejection.ref for rejection in rejections] == [
        workflow_ref("wf-b"),
        "refs/heads/main",
    ]


# --- the hook -------------------------------------------------------------------------------


def test_parse_updates_rejects_malformed_line() -> None:
    assert parse_updates([f"{ZERO_SHA} {'a' * 40} refs/heads/main\n", "\n"]) == [
        RefUpdate(ZERO_SHA, "a" * 40, "refs/heads/main")
    ]
    with pytest.raises(ValueError, match="expected '<old> <new> <ref>'"):
        parse_updates(["only two\n"])


def test_hook_prints_each_rejection(scene: Scene) -> None:
    bad = scene.event("wf-b", 0)
    lines = [f"{scene.first['wf-b']} {bad} {workflow_ref('wf-b')}\n"]
    stderr = io.StringIO()

    status = run_hook(scene.repo, principal_environment(NODE_A), lines, stderr)

    assert status == 1
    assert stderr.getvalue().startswith("tinkops: rejected refs/tinkops/workflows/wf-b: ")
    assert stderr.getvalue().count("\n") == 1


def audited_environment(principal: Principal, audit_log: Path, **extra: str) -> dict[str, str]:
    return {
        **principal_environment(principal),
        **HookSettings(audit_log=audit_log).environment(),
        "TINKOPS_REMOTE_ADDRESS": "192.0.2.7:40000",
        **extra,
    }


def test_hook_audits_rejection(scene: Scene, tmp_path: Path) -> None:
    bad = scene.event("wf-b", 0)
    lines = [f"{scene.first['wf-b']} {bad} {workflow_ref('wf-b')}\n"]
    audit_log = tmp_path / "audit.log"

    status = run_hook(scene.repo, audited_environment(NODE_A, audit_log), lines, io.StringIO())

    assert status == 1
    [record] = read_records(audit_log)
    assert record.decision is Decision.REJECTED
    assert record.stage is Stage.POLICY
    assert (record.role, record.principal, record.fingerprint) == (
        "worker",
        "node-a",
        "SHA256:node-a",
    )
    assert record.worker_ids == (WORKER_A,)
    assert record.remote_address == "192.0.2.7:40000"
    assert [(c.ref, c.old, c.new) for c in record.refs] == [
        (workflow_ref("wf-b"), scene.first["wf-b"], bad)
    ]
    assert record.reasons[0].startswith("rejected refs/tinkops/workflows/wf-b: workflow wf-b")
    assert audit_log.stat().st_mode & 0o777 == 0o600


def test_hook_audits_acceptance_and_hands_record_over(scene: Scene, tmp_path: Path) -> None:
    good = scene.event("wf-a", 0)
    lines = [f"{scene.first['wf-a']} {good} {workflow_ref('wf-a')}\n"]
    audit_log = tmp_path / "audit.log"
    handoff = tmp_path / "handoff.json"
    environment = audited_environment(NODE_A, audit_log, TINKOPS_AUDIT_RECORD=str(handoff))

    status = run_hook(scene.repo, environment, lines, io.StringIO())

    assert status == 0
    [record] = read_records(audit_log)
    assert record.decision is Decision.ACCEPTED
    assert record.reasons == ()
    assert json.loads(handoff.read_text()) == record.to_dict()


def test_hook_rejects_push_it_cannot_audit(scene: Scene, tmp_path: Path) -> None:
    good = scene.event("wf-a", 0)
    lines = [f"{scene.first['wf-a']} {good} {workflow_ref('wf-a')}\n"]
    missing = tmp_path / "no-such-folder" / "audit.log"
    handoff = tmp_path / "handoff.json"
    environment = audited_environment(NODE_A, missing, TINKOPS_AUDIT_RECORD=str(handoff))
    stderr = io.StringIO()

    status = run_hook(scene.repo, environment, lines, stderr)

    assert status == 1
    assert "accepts no push that it cannot record in its audit log" in stderr.getvalue()
    # The pusher does not learn the provisioner's paths, but the record for the server has them.
    assert str(tmp_path) not in stderr.getvalue()
    handed_over = json.loads(handoff.read_text())
    assert handed_over["decision"] == "rejected"
    assert (
        f"writing the audit log failed: [Errno 2] No such file or directory: '{missing}'"
        in (handed_over["reasons"][-1])
    )


class BrokenRepo(GitRepo):
    """A repository whose reads fail, as on a full or failing disk."""

    def read_file(self, rev: str, path: str) -> bytes | None:
        raise OSError(f"cannot read {rev}:{path} in /srv/secret-layout")


def test_hook_fails_closed_on_policy_error(scene: Scene, tmp_path: Path) -> None:
    good = scene.event("wf-a", 0)
    lines = [f"{scene.first['wf-a']} {good} {workflow_ref('wf-a')}\n"]
    audit_log = tmp_path / "audit.log"
    environment = audited_environment(NODE_A, audit_log, TINKOPS_MAIN_BRANCH="main")
    stderr = io.StringIO()

    status = run_hook(BrokenRepo(scene.repo.path), environment, lines, stderr)

    assert status == 1
    assert "the push policy could not check it" in stderr.getvalue()
    assert "/srv/secret-layout" not in stderr.getvalue()
    [record] = read_records(audit_log)
    assert record.decision is Decision.REJECTED
    assert "/srv/secret-layout" in record.reasons[-1]


def test_hook_reads_policy_settings(scene: Scene, tmp_path: Path) -> None:
    unrelated = operator_commit(scene, None, b"rewritten\n")
    lines = [f"{scene.main} {unrelated} refs/heads/main\n"]
    audit_log = tmp_path / "audit.log"

    forced = audited_environment(
        OPERATOR, audit_log, TINKOPS_ALLOW_FORCE_PUSH_MAIN="true", TINKOPS_MAIN_BRANCH="main"
    )
    other_main = audited_environment(OPERATOR, audit_log, TINKOPS_MAIN_BRANCH="trunk")
    default = audited_environment(OPERATOR, audit_log)

    assert run_hook(scene.repo, forced, lines, io.StringIO()) == 0
    assert run_hook(scene.repo, other_main, lines, io.StringIO()) == 0
    assert run_hook(scene.repo, default, lines, io.StringIO()) == 1


def test_hook_allows_push_without_role(scene: Scene) -> None:
    bad = scene.event("wf-b", 0)
    lines = [f"{scene.first['wf-b']} {bad} {workflow_ref('wf-b')}\n"]
    stderr = io.StringIO()

    assert run_hook(scene.repo, {}, lines, stderr) == 0
    assert stderr.getvalue() == ""


def test_hook_rejects_unknown_role(scene: Scene) -> None:
    stderr = io.StringIO()

    status = run_hook(scene.repo, {"TINKOPS_ROLE": "admin"}, [], stderr)

    assert status == 1
    assert "'admin' is not a role" in stderr.getvalue()


def test_main_branch_follows_head(tmp_path: Path) -> None:
    repo = init_bare(tmp_path / "trunk.git", "trunk")

    assert main_branch(repo) == "trunk"


def test_installed_hook_checks_quarantined_push(scene: Scene, tmp_path: Path) -> None:
    hook = install_hooks(scene.repo.path)
    assert os.access(hook, os.X_OK)
    agent = init_bare(tmp_path / "agent.git", "main")
    ref = workflow_ref("wf-a")
    agent.run("fetch", str(scene.repo.path), f"{ref}:{ref}")
    agent_scene = Scene(agent, scene.main, scene.first)
    good = agent_scene.event("wf-a", 0)
    forged = agent_scene.event("wf-a", 2, worker=WORKER_B)

    def push(commit: str, environment: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        return agent.execute("push", str(scene.repo.path), f"{commit}:{ref}", env=environment)

    rejected = push(forged, principal_environment(NODE_A))
    assert rejected.returncode != 0
    assert b"tinkops: rejected refs/tinkops/workflows/wf-a" in rejected.stderr
    assert scene.repo.rev_parse(ref) == scene.first["wf-a"]
    assert scene.repo.execute("cat-file", "-e", forged).returncode != 0

    accepted = push(good, principal_environment(NODE_A))
    assert accepted.returncode == 0, accepted.stderr.decode()
    assert scene.repo.rev_parse(ref) == good


def test_installed_hook_allows_local_push(scene: Scene, tmp_path: Path) -> None:
    install_hooks(scene.repo.path)
    clone = tmp_path / "clone.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(scene.repo.path), str(clone)], check=True)
    local = GitRepo(clone)
    commit = operator_commit(Scene(local, scene.main, scene.first), scene.main, b"local\n")

    result = local.execute("push", str(scene.repo.path), f"+{commit}:{workflow_ref('wf-a')}")

    assert result.returncode == 0, result.stderr.decode()
    assert scene.repo.rev_parse(workflow_ref("wf-a")) == commit
