"""The process runtime: runs an action's command directly on the host.

It exists for development and demos on machines without Docker. The command runs without
a shell (unless the command is itself a shell), in its own process group, with the merged
environment on top of a minimal one. The workflow directory is its working directory and
is also given as WORKFLOW_DIR. Images, volumes and ``pid`` have no meaning here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from tinkops_agent.protocol import State
from tinkops_agent.runtime import (
    LABEL_ACTION,
    WORKFLOW_MOUNT,
    ContainerSpec,
    RunResult,
    read_log_tail,
    volume_target,
)

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_POLL_SECONDS = 0.1


class ProcessRuntime:
    """Runs each action's command as a host process.

    ``base_environment`` is the environment every command starts from, before the
    action's own. By default it contains only PATH.
    """

    def __init__(self, *, base_environment: Mapping[str, str] | None = None) -> None:
        if base_environment is None:
            base_environment = {"PATH": DEFAULT_PATH}
        self._base_environment = dict(base_environment)

    def describe(self) -> str:
        return (
            "host processes without containers: each action's command runs on this machine "
            "as the agent's user; images, volumes and pid settings are ignored"
        )

    def cleanup(self, labels: Mapping[str, str]) -> int:
        """Return 0, because host processes carry no labels to find them by.

        A process group that a crashed agent left running keeps running.
        """
        return 0

    def run(
        self, spec: ContainerSpec, log_path: Path, cancel: threading.Event | None = None
    ) -> RunResult:
        """Run the command of ``spec``. A timeout or ``cancel`` kills its process group."""
        action = spec.labels.get(LABEL_ACTION, spec.name)
        if cancel is not None and cancel.is_set():
            return _unstarted(State.CANCELLED, "cancelled before it started", log_path)
        if not spec.command:
            message = f"the process runtime runs an action's command; action {action!r} has none"
            return _unstarted(State.FAILED, message, log_path)

        notes = _ignored_settings(spec)
        environment = {
            **self._base_environment,
            **spec.environment,
            "WORKFLOW_DIR": str(spec.workflow_dir),
        }
        spec.workflow_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)

        started = time.monotonic()
        with log_path.open("wb") as log_file:
            try:
                process = subprocess.Popen(
                    list(spec.command),
                    cwd=spec.workflow_dir,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as error:
                message = f"command {spec.command[0]!r} of action {action!r} did not start: {error}"
                return _unstarted(State.FAILED, message, log_path, tuple(notes))
            stopped_as = _wait_or_kill(process, spec.timeout, cancel)
            # Like a container's removal, the end of the action ends its background processes.
            _kill_group(process.pid)

        state, message = _outcome(stopped_as, process.returncode, spec.timeout)
        logger.info("action %s (process %d) ended: %s", action, process.pid, message)
        return RunResult(
            state=state,
            exit_code=process.returncode,
            seconds=time.monotonic() - started,
            message=message,
            log_tail=read_log_tail(log_path),
            log_path=log_path,
            notes=tuple(notes),
        )


def _ignored_settings(spec: ContainerSpec) -> list[str]:
    volumes = [volume for volume in spec.volumes if volume_target(volume) != WORKFLOW_MOUNT]
    notes = []
    if volumes:
        notes.append(f"the process runtime ignores volumes: {', '.join(volumes)}")
    if spec.pid:
        notes.append(f"the process runtime ignores pid: {spec.pid}")
    return notes


def _wait_or_kill(
    process: subprocess.Popen[bytes], timeout: float | None, cancel: threading.Event | None
) -> State | None:
    """Wait for ``process`` to exit, or kill its group on timeout or cancel and return which."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            process.wait(_POLL_SECONDS)
            return None
        except subprocess.TimeoutExpired:
            pass
        if cancel is not None and cancel.is_set():
            reason = State.CANCELLED
        elif deadline is not None and time.monotonic() >= deadline:
            reason = State.TIMEOUT
        else:
            continue
        logger.info("killing process group %d: %s", process.pid, reason.value)
        _kill_group(process.pid)
        process.wait()
        return reason


def _kill_group(process_group: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process_group, signal.SIGKILL)


def _outcome(stopped_as: State | None, returncode: int, timeout: float | None) -> tuple[State, str]:
    if stopped_as is State.TIMEOUT:
        return State.TIMEOUT, f"timed out after {timeout:g} s; its process group was killed"
    if stopped_as is State.CANCELLED:
        return State.CANCELLED, "cancelled; its process group was killed"
    if returncode == 0:
        return State.SUCCESS, "exited with code 0"
    if returncode < 0:
        return State.FAILED, f"killed by signal {_signal_name(-returncode)}"
    return State.FAILED, f"exited with code {returncode}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _unstarted(
    state: State, message: str, log_path: Path, notes: tuple[str, ...] = ()
) -> RunResult:
    return RunResult(
        state=state,
        exit_code=None,
        seconds=0.0,
        message=message,
        log_tail="",
        log_path=log_path,
        notes=notes,
    )
