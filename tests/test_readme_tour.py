"""The README's tour and the user guide, run as they are written against real processes.

Each page's shell blocks run in one ``bash -e`` session: ``tinkops serve`` in the background
on a free loopback port, agents with the process runtime, and the operator's commands.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
USER_GUIDE = ROOT / "docs" / "user-guide.md"
SKIP_MARK = "<!-- skipped by tests"
_FENCE = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def shell_blocks(markdown: str) -> list[str]:
    """Return the ``sh`` blocks of ``markdown`` in order, leaving out those marked skipped."""
    blocks = []
    for match in _FENCE.finditer(markdown):
        before = markdown[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if not before.startswith(SKIP_MARK):
            blocks.append(match.group(1))
    return blocks


def section(markdown: str, heading: str) -> str:
    """Return the text under the level-two ``heading``, up to the next level-two heading."""
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else len(markdown)]


def free_port() -> int:
    """Return a loopback port that is free now, below the kernel's ephemeral range.

    The session binds it seconds later. Other tests bind port 0, which the kernel serves
    from the ephemeral range (32768 and up by default on Linux), so a port below it is far
    less likely to be taken in between.
    """
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port between 20000 and 32000")


def command_shims(folder: Path) -> Path:
    """Write ``tinkops`` and ``tinkops-agent`` commands that run this interpreter's modules."""
    folder.mkdir()
    for name, module in (("tinkops", "tinkops.cli"), ("tinkops-agent", "tinkops_agent.cli")):
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        shim.chmod(0o755)
    return folder


def run_session(
    script: str, tmp_path: Path, scratch: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with bash -e in ``tmp_path``; stop every process it left behind.

    ``scratch`` becomes TMPDIR, where ``mktemp`` and the agent's SSH control sockets go.
    """
    env = dict(os.environ)
    env["PATH"] = f"{command_shims(tmp_path / 'bin')}{os.pathsep}{env['PATH']}"
    env["PORT"] = str(free_port())
    env["TMPDIR"] = str(scratch)
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the session did not end within {timeout} s:\n{output}") from None
    finally:
        # The session's background processes (server, agents) share its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


@pytest.fixture
def needs_ssh(openssh_client: str) -> None:
    """The sessions clone and push with stock git over OpenSSH."""


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary folder with a short path, for TMPDIR.

    The agent keeps its SSH control socket under TMPDIR, and OpenSSH creates it at that path
    plus 17 characters, which must all fit in a Unix socket path (108 bytes on Linux).
    """
    folder = Path(tempfile.mkdtemp(prefix="t"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_readme_quick_start_commands() -> None:
    blocks = shell_blocks(section(README.read_text(), "Quick start"))

    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    assert commands == ["./dev demo", "./dev test"]


def test_readme_tour_reaches_success(tmp_path: Path, scratch: Path, needs_ssh: None) -> None:
    blocks = shell_blocks(section(README.read_text(), "A short tour"))
    assert len(blocks) == 1

    result = run_session(blocks[0], tmp_path, scratch, timeout=180)

    assert result.returncode == 0, result.stdout
    assert "Workflow hello-1 ended SUCCESS" in result.stdout
    assert "Workflow hello-2 ended SUCCESS" in result.stdout
    assert '{"greeting": "Hello from tinkops", "mode": "0600"}' in result.stdout
    assert "Request workflow hello-2 from template hello-world" in result.stdout
    assert "tinkops agent 08:00:27:00:00:01: SUCCESS hello-world/write-data" in result.stdout


def test_user_guide_reaches_success(tmp_path: Path, scratch: Path, needs_ssh: None) -> None:
    guide = USER_GUIDE.read_text()
    blocks = shell_blocks(guide)
    assert len(blocks) == guide.count("```sh") - guide.count(SKIP_MARK)

    result = run_session("\n".join(blocks), tmp_path, scratch, timeout=300)

    assert result.returncode == 0, result.stdout
    for workflow in ("inventory-1", "hello-machine2", "hello-machine3", "inventory-1-rerun-1"):
        assert f"Workflow {workflow} ended SUCCESS" in result.stdout, workflow
    assert "Workflow wait-1 ended CANCELLED" in result.stdout
    assert "wait-1 did not end SUCCESS" in result.stdout
    assert '"collected_on": ' in result.stdout
    assert "SUCCESS report/read-back on 08:00:27:00:00:03" in result.stdout
