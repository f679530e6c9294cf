"""The agent's command line: registry credentials and bad configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinkops_agent.cli import load_registry_auth


def test_registry_credentials_read(tmp_path: Path) -> None:
    path = tmp_path / "registries.yaml"
    path.write_text("quay.io:\n  username: robot\n  password: '0600'\n")
    assert load_registry_auth(str(path)) == {"quay.io": ("robot", "0600")}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("- not a mapping\n", "must map registry hosts"),
        ("quay.io: {username: robot}\n", "needs username and password"),
        ("quay.io: [unclosed\n", "cannot read --registry-credentials"),
    ],
)
def test_registry_credentials_rejected(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "registries.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as caught:
        load_registry_auth(str(path))
    assert fragment in str(caught.value)


def test_missing_key_file_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinkops_agent.cli",
            "--worker-id",
            "08:00:27:00:00:01",
            "--provisioner",
            "ssh://127.0.0.1:9/tinkops.git",
            "--key",
            str(tmp_path / "none"),
            "--trust-on-first-use",
            "--state-dir",
            str(tmp_path / "state"),
            "--once",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "is not a readable private key file" in result.stderr
