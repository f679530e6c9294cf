"""The reconciler against real bare repositories made by ``init``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import wait_for
from tinkops.gitops import commit_file
from tinkops.home import init_home
from tinkops.reconciler import ReconcileLoop, Reconciler, read_status
from tinkops.workflows import list_workflow_ids
from tinkops_agent.eventlog import read_head
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import State, queue_ref, workflow_ref

WORKER = "08:00:27:00:00:01"


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    init_home(tmp_path / "home", include_requests=False, port=0)
    return GitRepo(tmp_path / "home" / "repository.git")


def add(repo: GitRepo, path: str, text: str | None) -> None:
    commit_file(repo, path, None if text is None else text.encode(), f"Change {path}\n")


def request_text(template: str = "hello-world", worker: str = WORKER) -> str:
    return f"template: {template}\nhardware_map:\n  device_1: {worker}\n"


def test_request_rendered_once(repo: GitRepo) -> None:
    add(repo, "workflows/one.yaml", request_text())
    reconciler = Reconciler(repo)

    first = reconciler.reconcile()
    second = reconciler.reconcile()

    assert first.created == ("one",)
    assert second.created == ()
    commit = repo.rev_parse(workflow_ref("one"))
    assert commit is not None
    assert repo.rev_parse(queue_ref(WORKER, "one")) == commit
    head = read_head(repo, commit)
    assert head.status.state is State.PENDING
    assert [task.worker for task in head.workflow.tasks] == [WORKER]
    assert head.workflow.tasks[0].actions[1].environment == {"MODE": "0600"}


def test_mac_in_any_notation_binds_worker(repo: GitRepo) -> None:
    add(repo, "workflows/upper.yaml", request_text(worker="08-00-27-00-00-01".upper()))
    assert Reconciler(repo).reconcile().created == ("upper",)
    head = read_head(repo, repo.rev_parse(workflow_ref("upper")) or "")
    assert head.workflow.tasks[0].worker == WORKER


def test_bad_request_leaves_others_rendering(repo: GitRepo) -> None:
    add(repo, "workflows/bad.yaml", request_text(template="missing"))
    add(repo, "workflows/broken.yaml", "template: [unclosed\n")
    add(repo, "workflows/good.yaml", request_text())

    result = Reconciler(repo).reconcile()

    assert result.created == ("good",)
    assert "template 'missing' not found" in result.failed["bad"][0]
    status = read_status(repo, "main")
    assert "bad" in status.failed_requests
    assert any("invalid YAML" in text for text in status.invalid_files["workflows/broken.yaml"])
    assert status.invalid_files["workflows/broken.yaml"][0].startswith("workflows/broken.yaml:")


def test_failed_request_renders_after_fix(repo: GitRepo) -> None:
    add(repo, "workflows/later.yaml", request_text(template="later"))
    reconciler = Reconciler(repo)
    assert reconciler.reconcile().created == ()

    template = repo.read_file("refs/heads/main", "templates/hello-world.yaml") or b""
    add(repo, "templates/later.yaml", template.decode())

    assert reconciler.reconcile().created == ("later",)
    assert read_status(repo, "main").failed_requests == {}


def test_rendered_workflow_immutable(repo: GitRepo) -> None:
    add(repo, "workflows/fixed.yaml", request_text())
    reconciler = Reconciler(repo)
    reconciler.reconcile()
    before = repo.rev_parse(workflow_ref("fixed"))

    add(repo, "templates/hello-world.yaml", "name: changed\ntasks: []\n")
    add(repo, "workflows/fixed.yaml", request_text(template="other"))
    reconciler.reconcile()

    assert repo.rev_parse(workflow_ref("fixed")) == before


def test_concurrent_reconcilers_render_once(repo: GitRepo) -> None:
    for index in range(10):
        add(repo, f"workflows/c{index}.yaml", request_text())
    reconcilers = [Reconciler(GitRepo(repo.path)) for _ in range(4)]
    created: list[str] = []
    lock = threading.Lock()

    def run(reconciler: Reconciler) -> None:
        result = reconciler.reconcile()
        with lock:
            created.extend(result.created)

    threads = [threading.Thread(target=run, args=(r,)) for r in reconcilers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(created) == [f"c{index}" for index in range(10)]
    assert len(list_workflow_ids(repo)) == 10
    for workflow_id in list_workflow_ids(repo):
        log = repo.text("rev-list", "--count", workflow_ref(workflow_id)).strip()
        assert log == "1"


def test_watch_triggers_without_polling(repo: GitRepo) -> None:
    loop = ReconcileLoop(Reconciler(repo), poll_interval=3600)
    loop.start(watch=repo.path)
    try:
        loop.trigger()
        wait_for(lambda: loop.passes >= 1, 10, "the first pass")
        started = time.monotonic()
        add(repo, "workflows/watched.yaml", request_text())
        wait_for(lambda: repo.rev_parse(workflow_ref("watched")), 10, "the watched workflow")
        assert time.monotonic() - started < 5
    finally:
        loop.stop()


def test_status_file_is_plain_yaml(repo: GitRepo) -> None:
    add(repo, "workflows/s.yaml", request_text())
    Reconciler(repo).reconcile()
    text = repo.read_file("refs/tinkops/status", "status.yaml") or b""
    data = yaml.safe_load(text)
    assert data["reconciled_commit"] == repo.rev_parse("refs/heads/main")
    assert data["failed_requests"] == {}
