"""``tinkops hardware push``: Tinkerbell's hardware documents committed as records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import run_git, tinkops
from tinkops.home import init_home

CORPUS = Path(__file__).parent / "corpus" / "good" / "hardware"
MACHINE1_ID = "0eba0bf8-3772-4b4a-ab9f-6ebe93b90a94"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    init_home(tmp_path / "home", include_requests=False, port=0)
    return tmp_path / "home"


def show(home: Path, path: str, rev: str = "main") -> str:
    return run_git(["-C", str(home / "repository.git"), "show", f"{rev}:{path}"])


def test_push_json_document(home: Path) -> None:
    result = tinkops(
        "hardware", "push", "--file", str(CORPUS / "c3-small-01.json"), "--repo", str(home)
    )

    assert "Hardware data pushed successfully" in result.stdout
    record = yaml.safe_load(show(home, "hardware/c3-small-01.yaml"))
    assert record["id"] == "5b1f2c7e-8d3a-4f60-9e21-3c4d5e6f7a01"
    assert record["network"]["interfaces"][0]["dhcp"]["mac"] == "0c:c4:7a:10:20:01"
    assert record["network"]["interfaces"][0]["dhcp"]["lease_time"] == 86400
    found = tinkops("hardware", "get", "10.20.0.11", "-o", "json", "--repo", str(home))
    assert json.loads(found.stdout)[0]["name"] == "c3-small-01"
    assert tinkops("validate", "main", "--repo", str(home)).returncode == 0


def test_push_from_stdin_expands_metadata(home: Path) -> None:
    document = (CORPUS / "legacy-04.json").read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "tinkops.cli", "hardware", "push", "--repo", str(home)],
        input=document,
        capture_output=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    # The v0.6 document has no hostname outside its metadata string, which is expanded.
    record = yaml.safe_load(show(home, "hardware/legacy-04.yaml"))
    assert record["metadata"]["state"] == "provisioning"


def test_push_resource_keeps_yaml(home: Path) -> None:
    tinkops("hardware", "push", "-f", str(CORPUS / "edge-03.yaml"), "--repo", str(home))
    assert show(home, "hardware/edge-03.yaml") == (CORPUS / "edge-03.yaml").read_text()


def test_repush_keeps_agent_keys(home: Path, tmp_path: Path) -> None:
    before = yaml.safe_load(show(home, "hardware/machine1.yaml"))
    document = {
        "id": MACHINE1_ID,
        "metadata": {"instance": {"hostname": "renamed-host"}},
        "network": {
            "interfaces": [{"dhcp": {"mac": "08:00:27:00:00:01", "hostname": "renamed-host"}}]
        },
    }
    path = tmp_path / "machine1.json"
    path.write_text(json.dumps(document))

    tinkops("hardware", "push", "-f", str(path), "--repo", str(home))

    after = yaml.safe_load(show(home, "hardware/machine1.yaml"))
    assert after["agent"] == before["agent"]
    assert after["agent"]["keys"][0].startswith("ssh-ed25519 ")
    assert after["metadata"]["instance"]["hostname"] == "renamed-host"
    files = run_git(["-C", str(home / "repository.git"), "ls-tree", "--name-only", "main:hardware"])
    assert files.split() == ["machine1.yaml"]


def test_conflicting_mac_rejected(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(
        '{\n  "id": "other",\n  "network": {"interfaces": [\n'
        '    {"dhcp": {"mac": "08-00-27-00-00-01"}}\n  ]}\n}\n'
    )

    result = tinkops("hardware", "push", "-f", str(path), "--repo", str(home), check=False)

    assert result.returncode == 1
    assert f"{path}:4: mac: MAC 08:00:27:00:00:01 is already owned by hardware/machine1.yaml" in (
        result.stderr
    )


def test_invalid_document_lists_every_problem(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        '{\n  "id": "bad",\n  "network": {"interfaces": [\n'
        '    {"dhcp": {"mac": "zz", "ip": {"address": "300.1.1.1"}}}\n  ]}\n}\n'
    )

    result = tinkops("hardware", "push", "-f", str(path), "--repo", str(home), check=False)

    assert result.returncode == 1
    assert "'zz' is not a MAC address" in result.stderr
    assert "'300.1.1.1' is not an IP address" in result.stderr


@pytest.mark.parametrize("hostname", ["../../etc/passwd", "has space", ".hidden"])
def test_escaping_name_rejected(home: Path, tmp_path: Path, hostname: str) -> None:
    path = tmp_path / "escape.json"
    document = {
        "id": "escape",
        "network": {"interfaces": [{"dhcp": {"mac": "08:00:27:00:00:99", "hostname": hostname}}]},
    }
    path.write_text(json.dumps(document))

    result = tinkops("hardware", "push", "-f", str(path), "--repo", str(home), check=False)

    assert result.returncode == 1
    assert "cannot be the record's file name" in result.stderr


def test_push_on_branch_leaves_main(home: Path) -> None:
    main_before = run_git(["-C", str(home / "repository.git"), "rev-parse", "main"])
    tinkops(
        "hardware",
        "push",
        "-f",
        str(CORPUS / "edge-03.yaml"),
        "--branch",
        "add-edge-03",
        "--repo",
        str(home),
    )
    assert run_git(["-C", str(home / "repository.git"), "rev-parse", "main"]) == main_before
    assert "kind: Hardware" in show(home, "hardware/edge-03.yaml", rev="add-edge-03")


def test_delete_record(home: Path) -> None:
    result = tinkops("hardware", "delete", "08:00:27:00:00:01", "--repo", str(home))
    assert f"Deleted\t{MACHINE1_ID}" in result.stdout
    files = run_git(["-C", str(home / "repository.git"), "ls-tree", "--name-only", "main"])
    assert "hardware" not in files.split()
