"""Repository upkeep: archiving finished workflows and packing refs."""

from __future__ import annotations

import time
from pathlib import Path

from tinkops.gitops import commit_file
from tinkops.home import init_home
from tinkops.maintenance import ARCHIVE_REF_PREFIX, count_loose_refs, maintain
from tinkops.reconciler import Reconciler
from tinkops.workflows import list_workflow_ids, load_workflow
from tinkops_agent.eventlog import append_event, new_event_id, read_head, utc_now
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.protocol import Event, EventKind, State, apply_action_event, workflow_ref

REQUEST = b"template: hello-world\nhardware_map:\n  device_1: 08:00:27:00:00:01\n"


def finish(repo: GitRepo, workflow_id: str) -> None:
    """Record SUCCESS for every action, as an agent would."""
    ref = workflow_ref(workflow_id)
    head = read_head(repo, repo.rev_parse(ref) or "")
    status = head.status
    for index in range(len(status.actions)):
        status = apply_action_event(status, index, State.SUCCESS, at=utc_now())
    event = Event(
        kind=EventKind.ACTION,
        workflow=workflow_id,
        workflow_state=status.state,
        worker="08:00:27:00:00:01",
        message="done",
        event_id=new_event_id(),
        created_at=utc_now(),
        task="hello-world",
        action="write-data",
        action_index=1,
        action_state=State.SUCCESS,
    )
    commit = append_event(repo, head.commit, status, event, Identity("a", "a@x.test"))
    assert repo.update_ref(ref, commit, head.commit)


def test_archive_keeps_workflows_readable_and_unrendered(tmp_path: Path) -> None:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    for name in ("old", "running"):
        commit_file(repo, f"workflows/{name}.yaml", REQUEST, f"Request {name}\n")
    Reconciler(repo).reconcile()
    finish(repo, "old")

    archived = maintain(repo, archive_after_days=1, now=time.time() + 2 * 86400)
    assert archived.archived == ("old",)
    assert archived.packed
    assert repo.rev_parse(workflow_ref("old")) is None
    assert repo.rev_parse(ARCHIVE_REF_PREFIX + "old") is not None
    assert set(list_workflow_ids(repo)) == {"running"}
    assert load_workflow(repo, "old").status.state is State.SUCCESS

    # A new reconciler (a restarted provisioner) must not render the archived request again.
    commit_file(repo, "workflows/new.yaml", REQUEST, "Request new\n")
    assert Reconciler(repo).reconcile().created == ("new",)


def test_recent_finished_workflows_stay(tmp_path: Path) -> None:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    commit_file(repo, "workflows/fresh.yaml", REQUEST, "Request fresh\n")
    Reconciler(repo).reconcile()
    finish(repo, "fresh")
    time.sleep(0.01)

    assert maintain(repo, archive_after_days=30).archived == ()
    assert repo.rev_parse(workflow_ref("fresh")) is not None


def test_many_loose_refs_get_packed(tmp_path: Path) -> None:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    head = repo.rev_parse("refs/heads/main") or ""
    payload = "".join(f"create refs/tinkops/test/r{n} {head}\n" for n in range(50))
    repo.run("update-ref", "--stdin", input=payload.encode())
    assert count_loose_refs(repo.path) > 50

    assert maintain(repo, loose_ref_limit=20).packed
    assert count_loose_refs(repo.path) < 5
