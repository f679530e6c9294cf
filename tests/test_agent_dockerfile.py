"""The agent's container image: ``agent/Dockerfile`` agrees with the agent package it builds.

Nothing is built here, because a build pulls its base image from a registry. These checks
catch the mistakes a build would show: a copied file that does not exist, an entry point
that is not installed, a base image older than the package allows.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"


def instructions() -> list[tuple[str, str]]:
    """Return ``(INSTRUCTION, arguments)`` for each instruction, continuation lines joined."""
    text = (AGENT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    return result


def agent_project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((AGENT / "pyproject.toml").read_text())["project"]
    return project


def test_base_image_is_slim_python_the_agent_supports() -> None:
    [base] = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    match = re.fullmatch(r"python:3\.(\d+)-slim", base)
    assert match, base

    required = re.fullmatch(r">=3\.(\d+)", str(agent_project()["requires-python"]))
    assert required
    assert int(match.group(1)) >= int(required.group(1))


def test_copied_files_exist() -> None:
    copies = [arguments for keyword, arguments in instructions() if keyword == "COPY"]
    assert copies

    for arguments in copies:
        *sources, _target = shlex.split(arguments)
        for source in sources:
            assert (AGENT / source).exists(), source


def test_package_and_its_project_file_copied() -> None:
    copies = [shlex.split(a) for k, a in instructions() if k == "COPY"]
    # As in Docker, a destination ending in "/" is a folder the source goes into.
    targets = {
        Path(parts[-1]) / Path(parts[0]).name if parts[-1].endswith("/") else Path(parts[-1])
        for parts in copies
    }
    [install] = [a for k, a in instructions() if k == "RUN" and "pip install" in a]
    folder = Path(shlex.split(install.split("&&")[0])[-1])

    assert folder / "pyproject.toml" in targets
    assert folder / "tinkops_agent" in targets


def test_entrypoint_is_the_agent_script() -> None:
    [entrypoint] = [arguments for keyword, arguments in instructions() if keyword == "ENTRYPOINT"]
    scripts = agent_project()["scripts"]
    assert isinstance(scripts, dict)

    assert entrypoint.startswith("["), "use the exec form, so signals reach the agent"
    assert entrypoint == '["tinkops-agent"]'
    assert "tinkops-agent" in scripts


@pytest.mark.parametrize("package", ["git", "openssh-client"])
def test_git_and_ssh_installed(package: str) -> None:
    runs = " ".join(arguments for keyword, arguments in instructions() if keyword == "RUN")

    assert re.search(rf"apt-get install [^&]*\b{re.escape(package)}\b", runs), package


def test_state_folder_is_the_agent_default() -> None:
    from tinkops_agent.cli import DEFAULTS

    [volume] = [arguments for keyword, arguments in instructions() if keyword == "VOLUME"]
    assert volume == DEFAULTS["state_dir"]
