"""The reconciler killed with SIGKILL at random points: nothing partial, nothing twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tinkops.home import init_home
from tinkops.reconciler import Reconciler
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.protocol import QUEUE_REF_PREFIX, WORKFLOW_REF_PREFIX, queue_ref

WORKER = "08:00:27:00:00:01"
ITERATIONS = 50
REQUESTS_PER_ITERATION = 20
REQUEST = b"template: hello-world\nhardware_map:\n  device_1: 08:00:27:00:00:01\n"


def add_requests(repo: GitRepo, names: list[str], scratch: Path) -> None:
    """Commit requests on main with plumbing, as an operator's push would land them."""
    base = repo.rev_parse("refs/heads/main") or ""
    env = {"GIT_INDEX_FILE": str(scratch / "index")}
    repo.run("read-tree", base, env=env)
    blob = repo.write_blob(REQUEST)
    lines = "".join(f"100644 {blob}\tworkflows/{name}.yaml\n" for name in names)
    repo.run("update-index", "--index-info", input=lines.encode(), env=env)
    tree = repo.text("write-tree", env=env).strip()
    commit = repo.commit_tree(tree, [base], "Request workflows\n", Identity("op", "op@x.test"))
    assert repo.update_ref("refs/heads/main", commit, base)


def check_consistent(repo: GitRepo, requested: set[str], *, fsck: bool = True) -> set[str]:
    """Assert every rendered workflow is whole and valid; return the rendered ids."""
    workflows = repo.refs(WORKFLOW_REF_PREFIX)
    rendered = {ref[len(WORKFLOW_REF_PREFIX) :] for ref in workflows}
    assert rendered <= requested
    queues = repo.refs(QUEUE_REF_PREFIX)
    for workflow_id in rendered:
        commit = workflows[WORKFLOW_REF_PREFIX + workflow_id]
        assert repo.text("rev-list", "--count", commit).strip() == "1", workflow_id
        definition = repo.read_file(commit, "workflow.yaml") or b""
        assert f"id: {workflow_id}\n".encode() in definition
        assert repo.read_file(commit, "state.json") is not None
        # Workflow and queue refs are created in one transaction: both or neither.
        assert queues.get(queue_ref(WORKER, workflow_id)) == commit, workflow_id
    assert set(queues) == {queue_ref(WORKER, workflow_id) for workflow_id in rendered}
    if fsck:
        checked = repo.execute("fsck", "--connectivity-only", "--no-progress")
        assert checked.returncode == 0, checked.stderr.decode()
    return rendered


def start_pass(repo: GitRepo) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tinkops.cli", "reconcile", "--once", "--repo", str(repo.path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for_orphans(group: int) -> None:
    """Wait until git children of a killed pass have exited: a git command the pass started
    finishes its own work (a ref transaction renames its refs one by one), and checking
    while it runs would read a transaction half committed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes of the killed pass {group} are still running")


def test_sigkill_at_random_points(tmp_path: Path) -> None:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    chance = random.Random(20261204)
    requested: set[str] = set()
    kills = 0

    # One undisturbed pass of the same size tells how long a pass lives on this machine, so
    # the kills land anywhere from start-up to the last ref transaction.
    started = time.monotonic()
    calibration = start_pass(repo)
    assert calibration.wait(timeout=120) == 0
    calibration.stderr.close()  # type: ignore[union-attr]
    lifetime = (time.monotonic() - started) * 1.5

    for iteration in range(ITERATIONS):
        names = [f"w{iteration:02d}-{index:02d}" for index in range(REQUESTS_PER_ITERATION)]
        add_requests(repo, names, tmp_path)
        requested.update(names)
        process = start_pass(repo)
        time.sleep(chance.uniform(0.0, lifetime))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        _, stderr = process.communicate()
        assert process.returncode in (0, -signal.SIGKILL), stderr.decode()
        wait_for_orphans(process.pid)
        check_consistent(repo, requested, fsck=iteration % 10 == 9)

    assert kills >= ITERATIONS // 4, f"only {kills} runs were killed; the test proves little"
    result = Reconciler(repo).reconcile()
    assert result.failed == {}
    assert check_consistent(repo, requested) == requested
