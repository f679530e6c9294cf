"""Operating a running provisioner: reconcile, status, metrics, concurrent operators."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Served, push_files, request, run_git, serve, tinkops


@pytest.fixture
def served(tmp_path: Path, openssh_client: str) -> Iterator[Served]:
    provisioner = serve(tmp_path / "provisioner", serve_args=("--metrics-port", "0"))
    yield provisioner
    provisioner.stop()


def test_reconcile_waits_for_pushed_request(served: Served, tmp_path: Path) -> None:
    clone = served.clone(tmp_path / "operator")
    push_files(served, clone, {"workflows/op-1.yaml": request("hello-world")}, "Request op-1")

    result = tinkops("reconcile", "--repo", str(clone), "--timeout", "30")

    assert "Reconciled main at" in result.stdout
    state = tinkops("workflow", "state", "op-1", "--repo", str(clone), "-o", "json").stdout
    assert {"field_name": "Workflow State", "values": "PENDING"} in json.loads(state)


def test_status_lists_states_and_problems(served: Served, tmp_path: Path) -> None:
    clone = served.clone(tmp_path / "operator")
    push_files(
        served,
        clone,
        {
            "workflows/ok-1.yaml": request("hello-world"),
            "workflows/bad-1.yaml": request("no-such-template"),
            "hardware/broken.yaml": "id: [unclosed\n",
        },
        "Mixed changes",
    )
    tinkops("reconcile", "--repo", str(clone), "--timeout", "30")

    rows = json.loads(tinkops("status", "--repo", str(clone), "-o", "json").stdout)
    fields = {row["field_name"]: row["values"] for row in rows}
    assert fields["Commits Behind"] == "0"
    assert fields["Invalid Files"] == "1"
    assert fields["Failed Requests"] == "1"
    assert fields["Workflows PENDING"] == "1"
    table = tinkops("status", "--repo", str(clone)).stdout
    assert "hardware/broken.yaml:2: invalid YAML" in table
    assert "request bad-1:" in table


def test_metrics_endpoint(served: Served, tmp_path: Path) -> None:
    clone = served.clone(tmp_path / "operator")
    push_files(served, clone, {"workflows/m-1.yaml": request("hello-world")}, "Request m-1")
    tinkops("reconcile", "--repo", str(clone), "--timeout", "30")

    assert served.metrics_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text = response.read().decode()

    assert "tinkops_reconcile_duration_seconds_count" in text
    assert 'tinkops_workflows{state="PENDING"} 1' in text
    assert "tinkops_reconcile_lag_seconds 0.000" in text
    assert "tinkops_workflows_created_total 1" in text


def test_concurrent_operators_lose_nothing(served: Served, tmp_path: Path) -> None:
    clones = [served.clone(tmp_path / f"operator-{index}") for index in range(4)]
    errors: list[BaseException] = []

    def push_requests(index: int, clone: Path) -> None:
        try:
            for number in range(5):
                name = f"c{index}-{number}"
                (clone / "workflows").mkdir(exist_ok=True)
                (clone / "workflows" / f"{name}.yaml").write_text(request("hello-world"))
                run_git(["-C", str(clone), "add", "workflows"])
                run_git(["-C", str(clone), "commit", "--quiet", "-m", f"Request {name}"])
                for _attempt in range(20):
                    pushed = run_push(served, clone)
                    if pushed:
                        break
                    run_git(
                        ["-C", str(clone), "pull", "--quiet", "--rebase", "origin", "main"],
                        env=served.git_env(),
                    )
                else:
                    raise AssertionError(f"{name} never landed")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=push_requests, args=(i, c)) for i, c in enumerate(clones)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    tinkops("reconcile", "--repo", str(clones[0]), "--timeout", "60")
    rows = json.loads(tinkops("workflow", "list", "-o", "json", "--repo", str(clones[0])).stdout)
    assert sorted(row["id"] for row in rows) == sorted(
        f"c{i}-{n}" for i in range(4) for n in range(5)
    )
    assert all(row["state"] == "PENDING" for row in rows)


def run_push(served: Served, clone: Path) -> bool:
    result = subprocess.run(
        ["git", "-C", str(clone), "push", "--quiet", "origin", "HEAD:main"],
        capture_output=True,
        text=True,
        env=served.git_env(),
        check=False,
    )
    if result.returncode == 0:
        return True
    assert "rejected" in result.stderr or "fetch first" in result.stderr, result.stderr
    return False


def passes(served: Served) -> int:
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("tinkops_reconcile_passes_total "):
                return int(line.split()[1])
    raise AssertionError("no pass counter in the metrics")


def test_idle_provisioner_stays_idle(served: Served) -> None:
    before = passes(served)
    time.sleep(3)
    after = passes(served)
    # Its own git reads must not wake the reconciler; only the 30 s poll may run a pass.
    assert after - before <= 1
