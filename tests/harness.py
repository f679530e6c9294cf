"""Real processes for end-to-end tests: ``tinkops serve``, agents, and an operator's clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKER_1 = "08:00:27:00:00:01"


def tinkops(
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``tinkops`` command line."""
    result = subprocess.run(
        [sys.executable, "-m", "tinkops.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"tinkops {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Served:
    """A provisioner home served by a ``tinkops serve`` process."""

    home: Path
    process: subprocess.Popen[str]
    url: str
    host_key: str
    fingerprint: str
    log: Path
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    metrics_url: str = ""

    @property
    def repository(self) -> Path:
        return self.home / "repository.git"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def git_env(self, key: Path | None = None) -> dict[str, str]:
        """Return an environment for stock git over OpenSSH, as the operator by default."""
        known_hosts = self.home / "test_known_hosts"
        line = f"[127.0.0.1]:{self.port} {self.host_key}\n"
        if not known_hosts.exists() or known_hosts.read_text() != line:
            # Threads share this file: replace it whole so no reader sees it half written.
            scratch = known_hosts.with_name(f"{known_hosts.name}.{threading.get_ident()}")
            scratch.write_text(line)
            os.replace(scratch, known_hosts)
        key = key or self.home / "keys" / "operator"
        env = dict(os.environ)
        env["GIT_SSH_COMMAND"] = (
            f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
        )
        return env

    def clone(self, target: Path) -> Path:
        env = self.git_env()
        run_git(["clone", "--quiet", self.url, str(target)], env=env)
        # As an operator's ~/.ssh/config would, the clone remembers how to reach origin.
        run_git(["-C", str(target), "config", "core.sshCommand", env["GIT_SSH_COMMAND"]])
        return target

    def start_agent(
        self,
        state_dir: Path,
        *,
        worker: str = WORKER_1,
        key: Path | None = None,
        runtime: str = "docker",
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "tinkops_agent.cli",
            "--worker-id",
            worker,
            "--provisioner",
            self.url,
            "--key",
            str(key or self.home / "keys" / "agent-machine1"),
            "--host-key-fingerprint",
            self.fingerprint,
            "--state-dir",
            str(state_dir),
            "--runtime",
            runtime,
            "--pull",
            "never",
            "--network",
            "none",
            "--poll-interval",
            "0.2",
            *extra,
        ]
        with (state_dir / "agent.log").open("ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.agents.append(process)
        return process

    def stop(self) -> None:
        for process in [*self.agents, self.process]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.agents, self.process]:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def serve(
    home: Path,
    *,
    init_args: Sequence[str] | None = ("--no-requests",),
    serve_args: Sequence[str] = (),
) -> Served:
    """Serve a provisioner home on a free loopback port, first creating it from repo-layout
    unless ``init_args`` is None."""
    if init_args is not None:
        tinkops("init", str(home), "--port", "0", *init_args)
    log = home / "serve.log"
    with log.open("a") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "tinkops.cli", "serve", "--home", str(home), "-v", *serve_args],
            stdout=subprocess.PIPE,
            stderr=stream,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    assert process.stdout is not None
    url = host_line = metrics = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (url and host_line):
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("Serving "):
            url = line.split()[1]
        if line.startswith("Metrics: "):
            metrics = line.split()[1]
        if line.startswith("Host key: "):
            host_line = line[len("Host key: ") :].strip()
    if not (url and host_line):
        process.kill()
        process.wait()
        process.stdout.close()
        raise AssertionError(f"tinkops serve did not start:\n{log.read_text()}")
    match = re.match(r"(\S+ \S+) \((SHA256:\S+)\)", host_line)
    assert match, host_line
    return Served(home, process, url, match.group(1), match.group(2), log, metrics_url=metrics)


def run_git(
    args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> str:
    result = subprocess.run(
        ["git", *args], capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def push_files(served: Served, clone: Path, files: dict[str, str], message: str) -> None:
    """Write files into the operator's clone, commit them and push main with stock git."""
    for path, content in files.items():
        target = clone / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        run_git(["-C", str(clone), "add", path])
    run_git(["-C", str(clone), "commit", "--quiet", "-m", message])
    run_git(["-C", str(clone), "push", "--quiet", "origin", "HEAD:main"], env=served.git_env())


def workflow_state(served: Served, workflow_id: str) -> dict[str, str]:
    """Return ``tinkops workflow state`` as a mapping, read from the provisioner's repository."""
    result = tinkops(
        "workflow",
        "state",
        workflow_id,
        "--output",
        "json",
        "--repo",
        str(served.home),
        check=False,
    )
    if result.returncode != 0:
        return {}
    return {row["field_name"]: row["values"] for row in json.loads(result.stdout)}


def busybox_template(
    name: str, actions: Sequence[tuple[str, str]], image: str, worker: str = "{{.device_1}}"
) -> str:
    """Return a template with one task running each ``(action name, shell script)``."""
    lines = [
        'version: "0.1"',
        f"name: {name}",
        "global_timeout: 300",
        "tasks:",
        "  - name: provision",
        f'    worker: "{worker}"',
        "    actions:",
    ]
    for action_name, script in actions:
        lines += [
            f"      - name: {json.dumps(action_name)}",
            f"        image: {image}",
            "        timeout: 60",
            "        command:",
            "          - /bin/sh",
            "          - -c",
            f"          - {json.dumps(script)}",
        ]
    return "\n".join(lines) + "\n"


def request(template: str, worker: str = WORKER_1) -> str:
    return f"template: {template}\nhardware_map:\n  device_1: {worker}\n"


def have_git_and_ssh() -> bool:
    return shutil.which("git") is not None and shutil.which("ssh") is not None
