"""The process runtime, running real commands on this machine."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from tinkops_agent.process_runtime import ProcessRuntime
from tinkops_agent.protocol import Action, State, Task
from tinkops_agent.runtime import ContainerSpec, RunResult, build_spec


def make_spec(
    tmp_path: Path,
    command: tuple[str, ...] | None,
    *,
    name: str = "test action",
    timeout: int = 0,
    task_environment: dict[str, str] | None = None,
    environment: dict[str, str] | None = None,
    volumes: tuple[str, ...] = (),
    pid: str | None = None,
) -> ContainerSpec:
    action = Action(
        name=name,
        image="quay.io/tinkerbell/actions/image2disk:latest",
        timeout=timeout,
        command=command,
        volumes=volumes,
        environment=environment or {},
        pid=pid,
    )
    task = Task(
        name="task",
        worker="08:00:27:00:00:01",
        actions=(action,),
        environment=task_environment or {},
    )
    workflow_id = "test-" + uuid.uuid4().hex[:8]
    return build_spec(workflow_id, 0, task, action, tmp_path / "workflow", default_timeout=60)


def shell(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script)


def run(spec: ContainerSpec, tmp_path: Path) -> RunResult:
    return ProcessRuntime().run(spec, tmp_path / "logs" / "action.log")


def process_gone(pid: int, within: float = 5.0) -> bool:
    """Return whether ``pid`` ends within ``within`` seconds; SIGKILL is delivered async."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not process_running(pid):
            return True
        time.sleep(0.05)
    return False


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child whose new parent has not reaped it yet is a zombie, which no longer runs.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def test_exit_zero_succeeds(tmp_path: Path) -> None:
    result = run(make_spec(tmp_path, ("echo", "hello from the action")), tmp_path)

    assert result.state is State.SUCCESS
    assert result.exit_code == 0
    assert result.log_tail == "hello from the action"
    assert result.log_path.read_text() == "hello from the action\n"


def test_nonzero_exit_fails(tmp_path: Path) -> None:
    result = run(make_spec(tmp_path, shell("echo broken >&2; exit 4")), tmp_path)

    assert result.state is State.FAILED
    assert result.exit_code == 4
    assert result.message == "exited with code 4"
    assert result.log_tail == "broken"


def test_signal_death_fails(tmp_path: Path) -> None:
    result = run(make_spec(tmp_path, shell("kill -SEGV $$")), tmp_path)

    assert result.state is State.FAILED
    assert result.message == "killed by signal SIGSEGV"


def test_no_shell_unless_command_is_one(tmp_path: Path) -> None:
    result = run(make_spec(tmp_path, ("echo", "$HOME", "a;b", "*")), tmp_path)

    assert result.log_tail == "$HOME a;b *"


def test_timeout_kills_process_group(tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {child_pid_file}; echo started; wait"
    spec = make_spec(tmp_path, shell(script), timeout=1)

    result = run(spec, tmp_path)

    assert result.state is State.TIMEOUT
    assert result.seconds < 10
    assert result.message == "timed out after 1 s; its process group was killed"
    assert result.log_tail == "started"
    assert process_gone(int(child_pid_file.read_text()))


def test_cancel_kills_process_group(tmp_path: Path) -> None:
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()

    result = ProcessRuntime().run(make_spec(tmp_path, ("sleep", "30")), tmp_path / "a.log", cancel)

    timer.cancel()
    assert result.state is State.CANCELLED
    assert result.seconds < 10


def test_background_process_ends_with_action(tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    script = f"sleep 30 > /dev/null 2>&1 & echo $! > {child_pid_file}"

    result = run(make_spec(tmp_path, shell(script)), tmp_path)

    assert result.state is State.SUCCESS
    assert process_gone(int(child_pid_file.read_text()))


def test_environment_merged_onto_minimal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_ONLY_VARIABLE", "must not leak")
    spec = make_spec(
        tmp_path,
        ("env",),
        task_environment={"SHARED": "task", "TASK_ONLY": "from task"},
        environment={"SHARED": "action", "MODE": "0600", "COMPRESSED": "true"},
    )

    result = run(spec, tmp_path)

    variables = dict(line.split("=", 1) for line in result.log_path.read_text().splitlines())
    assert variables["MODE"] == "0600"
    assert variables["COMPRESSED"] == "true"
    assert variables["SHARED"] == "action"
    assert variables["TASK_ONLY"] == "from task"
    assert variables["WORKFLOW_DIR"] == str(spec.workflow_dir)
    assert "PATH" in variables
    assert "AGENT_ONLY_VARIABLE" not in variables


def test_workflow_dir_is_working_directory(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, shell('pwd; echo data > "$WORKFLOW_DIR/x"'))

    result = run(spec, tmp_path)

    assert result.log_tail == str(spec.workflow_dir)
    assert (spec.workflow_dir / "x").read_text() == "data\n"


def test_action_without_command_fails(tmp_path: Path) -> None:
    result = run(make_spec(tmp_path, None, name="stream ubuntu image"), tmp_path)

    assert result.state is State.FAILED
    assert result.exit_code is None
    assert result.message == (
        "the process runtime runs an action's command; action 'stream ubuntu image' has none"
    )


def test_missing_executable_fails(tmp_path: Path) -> None:
    result = run(make_spec(tmp_path, ("no-such-tool-for-tinkops", "--flag")), tmp_path)

    assert result.state is State.FAILED
    assert result.exit_code is None
    assert "'no-such-tool-for-tinkops'" in result.message
    assert "did not start" in result.message


def test_ignored_settings_noted(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, ("true",), volumes=("/dev:/dev",), pid="host")

    result = run(spec, tmp_path)

    assert result.state is State.SUCCESS
    assert result.notes == (
        "the process runtime ignores volumes: /dev:/dev",
        "the process runtime ignores pid: host",
    )


def test_output_tail_bounded(tmp_path: Path) -> None:
    result = run(make_spec(tmp_path, ("seq", "1", "5000")), tmp_path)

    assert len(result.log_path.read_text().splitlines()) == 5000
    assert result.log_tail.splitlines() == [str(n) for n in range(4951, 5001)]


def test_describe_says_images_ignored() -> None:
    assert "images" in ProcessRuntime().describe()
    assert "ignored" in ProcessRuntime().describe()


def test_cleanup_finds_nothing() -> None:
    assert ProcessRuntime().cleanup({"tinkops.workflow": "wf"}) == 0


def test_cancel_before_start(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    started = time.monotonic()

    result = ProcessRuntime().run(make_spec(tmp_path, ("sleep", "30")), tmp_path / "a.log", cancel)

    assert result.state is State.CANCELLED
    assert time.monotonic() - started < 5
