"""A workflow from a pushed request to events in git log, through every real component:
``tinkops serve`` (embedded SSH server and reconciler), stock git and OpenSSH as the operator,
a separate agent process with its own key, and containers on the real Docker engine."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    WORKER_1,
    Served,
    busybox_template,
    push_files,
    request,
    run_git,
    serve,
    tinkops,
    wait_for,
    workflow_state,
)


@pytest.fixture
def served(tmp_path: Path, openssh_client: str) -> Iterator[Served]:
    provisioner = serve(tmp_path / "provisioner")
    yield provisioner
    provisioner.stop()


def run_to_end(
    served: Served,
    tmp_path: Path,
    busybox_image: str,
    workflow_id: str,
    actions: list[tuple[str, str]],
) -> dict[str, str]:
    clone = served.clone(tmp_path / "operator")
    push_files(
        served,
        clone,
        {
            "templates/e2e.yaml": busybox_template("e2e", actions, busybox_image),
            f"workflows/{workflow_id}.yaml": request("e2e"),
        },
        f"Request workflow {workflow_id}",
    )
    served.start_agent(tmp_path / "agent")
    return wait_for(
        lambda: (
            (state := workflow_state(served, workflow_id)).get("Workflow State")
            not in (None, "PENDING", "RUNNING")
            and state
        ),
        timeout=90,
        what=f"workflow {workflow_id} to finish",
    )


def test_pushed_request_runs_to_success(served: Served, tmp_path: Path, busybox_image: str) -> None:
    actions = [
        ("stream ubuntu image", 'echo "{\\"step\\": 1}" > /workflow/data; echo first'),
        ("check data", "cat /workflow/data; echo second > /workflow/second"),
    ]
    state = run_to_end(served, tmp_path, busybox_image, "e2e-1", actions)

    assert state["Workflow State"] == "SUCCESS"
    assert state["Workflow Progress"] == "100%"
    assert state["Current Action State"] == "STATE_SUCCESS"

    clone = tmp_path / "operator"
    events = json.loads(
        tinkops("workflow", "events", "e2e-1", "--output", "json", "--repo", str(clone)).stdout
    )
    observed = [(e["action_name"], e["action_status"], e["worker_id"]) for e in events]
    assert observed == [
        ("stream ubuntu image", "STATE_RUNNING", WORKER_1),
        ("stream ubuntu image", "STATE_SUCCESS", WORKER_1),
        ("check data", "STATE_RUNNING", WORKER_1),
        ("check data", "STATE_SUCCESS", WORKER_1),
    ]

    log = run_git(
        [
            "-C",
            str(served.repository),
            "log",
            "--reverse",
            "--format=%s",
            "refs/tinkops/workflows/e2e-1",
        ]
    ).splitlines()
    assert log[0].startswith("Create workflow e2e-1")
    assert log[1:] == [
        f"RUNNING provision/stream ubuntu image on {WORKER_1}",
        f"SUCCESS provision/stream ubuntu image on {WORKER_1}",
        f"RUNNING provision/check data on {WORKER_1}",
        f"SUCCESS provision/check data on {WORKER_1}",
    ]

    data = tinkops("workflow", "data", "e2e-1", "--repo", str(clone)).stdout
    assert json.loads(data) == {"step": 1}


def test_data_versions_and_logs(served: Served, tmp_path: Path, busybox_image: str) -> None:
    actions = [
        ("first", 'echo "{\\"v\\": 1}" > /workflow/data'),
        ("second", 'echo "{\\"v\\": 2}" > /workflow/data; echo line-from-second'),
    ]
    assert (
        run_to_end(served, tmp_path, busybox_image, "e2e-data", actions)["Workflow State"]
        == "SUCCESS"
    )
    repo = ("--repo", str(tmp_path / "operator"))

    latest = tinkops("workflow", "data", "e2e-data", "--latest-version", *repo).stdout
    assert latest.strip() == "Latest workflow data version: 2"
    assert json.loads(tinkops("workflow", "data", "e2e-data", "-v", "1", *repo).stdout) == {"v": 1}
    rows = json.loads(
        tinkops("workflow", "data", "e2e-data", "-v", "2", "--metadata", "-o", "json", *repo).stdout
    )
    fields = {row["field_name"]: row["values"] for row in rows}
    assert fields["Worker"] == WORKER_1
    assert fields["Action"] == "second"
    assert fields["SHA256"] == hashlib.sha256(b'{"v": 2}\n').hexdigest()
    missing = tinkops("workflow", "data", "e2e-data", "-v", "9", *repo, check=False)
    assert missing.returncode == 1
    assert "versions 1 to 2, not 9" in missing.stderr

    logs = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinkops_agent.cli",
            "logs",
            "e2e-data",
            "1",
            "--state-dir",
            str(tmp_path / "agent"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "line-from-second" in logs.stdout


def test_failing_action_ends_workflow_failed(
    served: Served, tmp_path: Path, busybox_image: str
) -> None:
    actions = [
        ("fails", "echo about to fail; exit 3"),
        ("never runs", "echo must not run > /workflow/ran"),
    ]
    state = run_to_end(served, tmp_path, busybox_image, "e2e-fail", actions)

    assert state["Workflow State"] == "FAILED"
    assert state["Current Action"] == "fails"
    assert state["Current Action State"] == "STATE_FAILED"

    events = json.loads(
        tinkops(
            "workflow", "events", "e2e-fail", "--output", "json", "--repo", str(served.home)
        ).stdout
    )
    assert [(e["action_name"], e["action_status"]) for e in events] == [
        ("fails", "STATE_RUNNING"),
        ("fails", "STATE_FAILED"),
    ]
    assert "exit" in events[1]["message"]
    assert "3" in events[1]["message"]
    files = run_git(
        [
            "-C",
            str(served.repository),
            "ls-tree",
            "-r",
            "--name-only",
            "refs/tinkops/workflows/e2e-fail",
        ]
    ).split()
    assert "ephemeral/ran" not in files
