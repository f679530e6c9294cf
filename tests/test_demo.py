"""The README's main command: ``tinkops demo`` runs the example workflow to SUCCESS."""

from __future__ import annotations

from pathlib import Path

from tests.harness import tinkops


def test_demo_reaches_success(tmp_path: Path, docker_client: object, busybox_image: str) -> None:
    result = tinkops("demo", "--home", str(tmp_path / "demo"), "--timeout", "90", timeout=180)

    output = result.stdout
    assert "Rendered workflow hello-1" in output
    assert "| Workflow State       | SUCCESS" in output
    assert "| Workflow Progress    | 100%" in output
    assert output.count("STATE_SUCCESS") >= 2
    assert "tinkops agent 08:00:27:00:00:01: SUCCESS hello-world/write-data" in output
    assert '"greeting": "Hello from tinkops"' in output


def test_demo_process_runtime(tmp_path: Path) -> None:
    result = tinkops(
        "demo",
        "--home",
        str(tmp_path / "demo"),
        "--runtime",
        "process",
        "--timeout",
        "60",
        timeout=120,
    )

    assert "each action's command runs directly on this machine" in result.stdout
    assert "| Workflow State       | SUCCESS" in result.stdout
