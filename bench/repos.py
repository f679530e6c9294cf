"""Generated infrastructure repositories for the benchmarks.

Hardware records and requests are committed on main with plumbing; existing workflows are
written straight to the object store as the reconciler writes them (same definition and state
format) and marked finished, then their refs are packed, as in a provisioner that has run
for a long time.
"""

from __future__ import annotations

import os
from pathlib import Path

from tinkops.home import init_home
from tinkops.objectwriter import ObjectWriter
from tinkops.workflows import RECONCILER, creation_message
from tinkops.yamltext import dump
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.protocol import (
    STATE_FILE,
    WORKFLOW_FILE,
    Action,
    State,
    Task,
    Workflow,
    WorkflowStatus,
    apply_action_event,
    workflow_ref,
)

OPERATOR = Identity("bench operator", "operator@bench.invalid")


def mac(number: int) -> str:
    """Return a distinct locally administered MAC for machine ``number``."""
    raw = f"02{number:010x}"
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


def hardware_record(number: int) -> bytes:
    return (
        f"id: 00000000-0000-4000-8000-{number:012d}\nnetwork:\n  interfaces:\n"
        f"    - dhcp:\n        mac: {mac(number)}\n        hostname: node-{number}\n"
        f"disks:\n  - device: /dev/sda\n"
    ).encode()


def request_text(number: int) -> bytes:
    return f"template: hello-world\nhardware_map:\n  device_1: {mac(number)}\n".encode()


def create(path: Path, *, hardware: int, requests: int = 0, rendered: int = 0) -> GitRepo:
    """Create a provisioner home at ``path`` and return its repository.

    ``requests`` request files are added on main; the first ``rendered`` of them already have
    finished workflows (their refs packed). Machines are reused round-robin by requests.
    """
    init_home(path, include_requests=False, generate_agent_keys=False, port=0)
    repo = GitRepo(path / "repository.git")
    files: dict[str, bytes] = {}
    for number in range(1, hardware + 1):
        files[f"hardware/node-{number:05d}.yaml"] = hardware_record(number)
    for number in range(requests):
        files[f"workflows/r{number:06d}.yaml"] = request_text(1 + number % max(hardware, 1))
    commit_files(repo, path, files, f"Add {hardware} machines and {requests} requests\n")
    if rendered:
        write_finished_workflows(repo, hardware, rendered)
    repo.run("pack-refs", "--all")
    return repo


def commit_files(repo: GitRepo, scratch: Path, files: dict[str, bytes], message: str) -> str:
    """Add ``files`` to main in one commit, through a throwaway index."""
    base = repo.rev_parse("refs/heads/main")
    env = {"GIT_INDEX_FILE": str(scratch / "bench-index")}
    repo.run("read-tree", base or "--empty", env=env)
    writer = ObjectWriter(repo.path)
    writer.batch()
    lines = "".join(f"100644 {writer.blob(data)}\t{name}\n" for name, data in files.items())
    writer.flush()
    repo.run("update-index", "--index-info", input=lines.encode(), env=env)
    tree = repo.text("write-tree", env=env).strip()
    os.unlink(scratch / "bench-index")
    commit = repo.commit_tree(tree, [base] if base else [], message, OPERATOR)
    assert repo.update_ref("refs/heads/main", commit, base)
    return commit


def write_finished_workflows(repo: GitRepo, hardware: int, count: int) -> None:
    writer = ObjectWriter(repo.path)
    writer.batch()
    lines = []
    for number in range(count):
        worker = mac(1 + number % max(hardware, 1))
        workflow = Workflow(
            id=f"r{number:06d}",
            template="hello-world",
            request=f"workflows/r{number:06d}.yaml",
            created_at="2026-01-01T00:00:00.000000Z",
            global_timeout=600,
            hardware_map={"device_1": worker},
            tasks=(
                Task(
                    name="hello-world",
                    worker=worker,
                    actions=(
                        Action(
                            name="hello-world",
                            image="busybox:latest",
                            timeout=60,
                            command=("/bin/sh", "-c", "echo hello"),
                        ),
                    ),
                ),
            ),
        )
        status = WorkflowStatus.initial(workflow)
        at = "2026-01-01T00:00:01Z"
        status = apply_action_event(status, 0, State.RUNNING, at=at)
        status = apply_action_event(status, 0, State.SUCCESS, at=at, seconds=1)
        tree = writer.files_tree(
            {
                WORKFLOW_FILE: dump(workflow.to_dict()).encode(),
                STATE_FILE: status.to_json().encode(),
            }
        )
        commit = writer.commit(tree, [], creation_message(workflow), RECONCILER)
        lines.append(f"create {workflow_ref(workflow.id)} {commit}\n")
    writer.flush()
    payload = "start\n" + "".join(lines) + "commit\n"
    repo.run("update-ref", "--stdin", input=payload.encode())
