"""The ``tinkops`` command line, run as a real process against real repositories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import run_git, tinkops
from tinkops.reconciler import Reconciler
from tinkops_agent.gitrepo import GitRepo

WORKER = "08:00:27:00:00:01"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    tinkops("init", str(tmp_path / "home"), "--port", "0", "--no-requests")
    return tmp_path / "home"


def reconcile(home: Path) -> None:
    Reconciler(GitRepo(home / "repository.git")).reconcile()


def test_init_creates_home(home: Path) -> None:
    assert (home / "repository.git" / "HEAD").exists()
    assert (home / "host_ed25519_key").stat().st_mode & 0o777 == 0o600
    record = run_git(["-C", str(home / "repository.git"), "show", "main:hardware/machine1.yaml"])
    assert "ssh-ed25519 " in record
    assert "tinkops-agent@machine1" in record


def test_init_refuses_existing_home(home: Path) -> None:
    result = tinkops("init", str(home), check=False)
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert result.stderr.count("\n") == 1


def test_template_list_and_get(home: Path) -> None:
    listing = tinkops("template", "list", "--repo", str(home)).stdout
    assert "hello-world" in listing
    text = tinkops("template", "get", "hello-world", "--raw", "--repo", str(home)).stdout
    assert 'worker: "{{.device_1}}"' in text


def test_hardware_get_by_mac_any_notation(home: Path) -> None:
    for key in ("machine1", "08-00-27-00-00-01", "0800.2700.0001", "08:00:27:00:00:01".upper()):
        result = tinkops("hardware", "get", key, "--output", "json", "--repo", str(home))
        rows = json.loads(result.stdout)
        assert rows[0]["mac_address"] == WORKER, key
        assert rows[0]["id"] == "0eba0bf8-3772-4b4a-ab9f-6ebe93b90a94"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("hardware", "get", "aa:bb:cc:dd:ee:ff"), "hardware 'aa:bb:cc:dd:ee:ff' not found"),
        (("template", "get", "nope"), "template 'nope' not found"),
        (("workflow", "state", "nope"), "workflow 'nope' not found"),
        (("workflow", "events", "nope"), "workflow 'nope' not found"),
        (
            ("workflow", "create", "-t", "nope", "-r", f'{{"device_1": "{WORKER}"}}'),
            "template 'nope' not found",
        ),
        (("workflow", "create", "-t", "hello-world", "-r", "{device_1"), "--hardware is not JSON"),
        (
            ("workflow", "create", "-t", "hello-world", "-r", "{}", "--id", "Bad Id"),
            "workflow id 'Bad Id' is invalid",
        ),
    ],
)
def test_errors_one_line_exit_1(home: Path, args: tuple[str, ...], fragment: str) -> None:
    result = tinkops(*args, "--repo", str(home), check=False)
    assert result.returncode == 1
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_usage_error_exit_2(home: Path) -> None:
    result = tinkops("workflow", "state", "--no-such-option", check=False)
    assert result.returncode == 2


def test_not_a_repository(tmp_path: Path) -> None:
    result = tinkops("template", "list", "--repo", str(tmp_path), check=False)
    assert result.returncode == 1
    assert "is not a git repository" in result.stderr


def test_workflow_create_then_state(home: Path) -> None:
    created = tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        f'{{"device_1": "{WORKER.upper()}"}}',
        "--id",
        "cli-1",
        "--repo",
        str(home),
    )
    assert "Created Workflow:  cli-1" in created.stdout
    request = run_git(["-C", str(home / "repository.git"), "show", "main:workflows/cli-1.yaml"])
    assert "template: hello-world" in request

    reconcile(home)
    state = json.loads(
        tinkops("workflow", "state", "cli-1", "-o", "json", "--repo", str(home)).stdout
    )
    fields = {row["field_name"]: row["values"] for row in state}
    assert fields["Workflow State"] == "PENDING"
    assert fields["Workflow Progress"] == "0%"
    assert fields["Current Worker"] == WORKER

    table = tinkops("workflow", "list", "--repo", str(home)).stdout
    assert "cli-1" in table
    assert "PENDING" in table


def test_workflow_create_on_branch(home: Path) -> None:
    main_before = run_git(["-C", str(home / "repository.git"), "rev-parse", "main"]).strip()
    tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        f'{{"device_1": "{WORKER}"}}',
        "--id",
        "pr-1",
        "--branch",
        "request-pr-1",
        "--repo",
        str(home),
    )
    main_after = run_git(["-C", str(home / "repository.git"), "rev-parse", "main"]).strip()
    assert main_after == main_before
    files = run_git(
        ["-C", str(home / "repository.git"), "ls-tree", "--name-only", "-r", "request-pr-1"]
    )
    assert "workflows/pr-1.yaml" in files


def test_workflow_list_shows_unrendered_request(home: Path) -> None:
    tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        '{"device_1": "aa:bb:cc:dd:ee:ff"}',
        "--id",
        "orphan",
        "--repo",
        str(home),
    )
    reconcile(home)
    rows = json.loads(tinkops("workflow", "list", "-o", "json", "--repo", str(home)).stdout)
    orphan = next(row for row in rows if row["id"] == "orphan")
    assert orphan["state"] == "NOT RENDERED"
    assert "no hardware record owns 'aa:bb:cc:dd:ee:ff'" in orphan["error"]


def test_create_twice_rejected(home: Path) -> None:
    args = (
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        f'{{"device_1": "{WORKER}"}}',
        "--id",
        "twice",
        "--repo",
        str(home),
    )
    tinkops(*args)
    result = tinkops(*args, check=False)
    assert result.returncode == 1
    assert "workflows/twice.yaml already exists" in result.stderr
