"""Tinkerbell's ``tink`` verbs and the GitOps verbs, run as real processes on real repositories.

Most tests work on a provisioner home directly (``--repo HOME``), where a change is a commit
on the bare repository's main branch and the reconciler runs in the test. The last ones work
in an operator's clone of a served provisioner, where every change is pushed over SSH and
real agents run the workflows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Served, run_git, serve, tinkops
from tinkops.gitops import commit_file
from tinkops.reconciler import Reconciler
from tinkops_agent.gitrepo import GitRepo

WORKER = "08:00:27:00:00:01"
MACHINE1_ID = "0eba0bf8-3772-4b4a-ab9f-6ebe93b90a94"
DEVICE = json.dumps({"device_1": WORKER})
ROOT = Path(__file__).resolve().parent.parent

TEMPLATE = """\
version: "0.1"
name: {name}
global_timeout: 120
tasks:
  - name: main
    worker: "{{{{.device_1}}}}"
    actions:
      - name: step
        image: busybox:latest
        timeout: {timeout}
        command: [/bin/sh, -c, "{script}"]
"""


def template_text(name: str, script: str = "true", timeout: int = 30) -> str:
    return TEMPLATE.format(name=name, script=script, timeout=timeout)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    tinkops("init", str(tmp_path / "home"), "--port", "0", "--no-requests")
    return tmp_path / "home"


def repo_of(home: Path) -> list[str]:
    return ["--repo", str(home)]


def git(home: Path, *args: str) -> str:
    return run_git(["-C", str(home / "repository.git"), *args])


def main_tip(home: Path) -> str:
    return git(home, "rev-parse", "main").strip()


def reconcile(home: Path) -> None:
    Reconciler(GitRepo(home / "repository.git")).reconcile()


def create_workflow(home: Path, workflow_id: str, template: str = "hello-world") -> None:
    tinkops("workflow", "create", "-t", template, "-r", DEVICE, "--id", workflow_id, *repo_of(home))


def fields(output: str) -> dict[str, str]:
    """Return a ``Field Name | Value(s)`` JSON listing as a mapping."""
    return {
        row["field_name"]: row.get("values", row.get("value", "")) for row in json.loads(output)
    }


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- hardware -------------------------------------------------------------------------------


def test_hardware_list_quiet_and_no_headers(home: Path) -> None:
    quiet = tinkops("hardware", "list", "-q", *repo_of(home)).stdout
    bare = tinkops("hardware", "list", "--no-headers", *repo_of(home)).stdout

    assert quiet.split() == [MACHINE1_ID]
    assert "MAC Address" not in bare
    assert WORKER in bare


def test_hardware_list_tinkerbell_columns(home: Path) -> None:
    table = tinkops("hardware", "list", *repo_of(home)).stdout

    header = table.splitlines()[1]
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "ID",
        "MAC Address",
        "IP Address",
        "Hostname",
        "Name",
    ]


def test_hardware_get_several_keys(home: Path) -> None:
    result = tinkops(
        "hardware", "get", "machine1", "192.168.56.43", "-o", "yaml", *repo_of(home)
    ).stdout

    assert result.count(f"id: {MACHINE1_ID}") == 1


def test_hardware_get_unknown_key(home: Path) -> None:
    result = tinkops("hardware", "get", "machine1", "no-such-machine", *repo_of(home), check=False)

    assert result.returncode == 1
    assert MACHINE1_ID in result.stdout
    assert "hardware 'no-such-machine' not found" in one_line_error(result)


def test_hardware_id_prints_json_lines(home: Path) -> None:
    result = tinkops("hardware", "id", MACHINE1_ID, "machine1", *repo_of(home)).stdout

    lines = result.splitlines()
    assert len(lines) == 2
    document = json.loads(lines[0])
    assert document["id"] == MACHINE1_ID
    dhcp = document["network"]["interfaces"][0]["dhcp"]
    assert dhcp["lease_time"] == 86400
    assert dhcp["uefi"] is False
    assert document["network"]["interfaces"][0]["netboot"]["allow_pxe"] is True
    assert document["metadata"]["instance"]["hostname"] == "machine1"
    assert document["metadata"]["instance"]["operating_system"]["version"] == "22.04"


def test_hardware_id_unknown(home: Path) -> None:
    result = tinkops(
        "hardware", "id", "5b1f2c7e-0000-0000-0000-000000000000", *repo_of(home), check=False
    )

    assert result.returncode == 1
    assert "not found" in one_line_error(result)


@pytest.mark.parametrize(
    "mac", ["08:00:27:00:00:01", "08:00:27:00:00:01".upper(), "08-00-27-00-00-01", "0800.2700.0001"]
)
def test_hardware_mac_any_notation(home: Path, mac: str) -> None:
    result = tinkops("hardware", "mac", mac, "-o", "json", *repo_of(home))

    [record] = json.loads(result.stdout)
    assert record == {
        "id": MACHINE1_ID,
        "mac_address": WORKER,
        "ip_address": "192.168.56.43",
        "hostname": "machine1",
    }


def test_hardware_mac_table(home: Path) -> None:
    table = tinkops("hardware", "mac", "080027000001", *repo_of(home)).stdout

    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert ["Field Name", "Value"] in rows
    assert ["ID", MACHINE1_ID] in rows
    assert ["MAC Address", WORKER] in rows
    assert ["IP Address", "192.168.56.43"] in rows
    assert ["Hostname", "machine1"] in rows


def test_hardware_mac_details_json(home: Path) -> None:
    result = tinkops("hardware", "mac", WORKER, "-d", *repo_of(home)).stdout

    assert json.loads(result)["id"] == MACHINE1_ID


def test_hardware_ip_lookup(home: Path) -> None:
    found = tinkops("hardware", "ip", "192.168.56.43", "-o", "json", *repo_of(home))
    missing = tinkops("hardware", "ip", "10.9.9.9", *repo_of(home), check=False)

    assert json.loads(found.stdout)[0]["mac_address"] == WORKER
    assert missing.returncode == 1
    assert "IP address '10.9.9.9' not found" in one_line_error(missing)


def test_hardware_mac_unknown(home: Path) -> None:
    result = tinkops("hardware", "mac", "aa:bb:cc:dd:ee:ff", *repo_of(home), check=False)

    assert result.returncode == 1
    assert result.stdout == ""
    assert "MAC address 'aa:bb:cc:dd:ee:ff' not found" in one_line_error(result)


def test_hardware_delete_several_then_unknown(home: Path, tmp_path: Path) -> None:
    document = {
        "id": "second",
        "network": {"interfaces": [{"dhcp": {"mac": "08:00:27:00:00:02", "hostname": "second"}}]},
    }
    (tmp_path / "second.json").write_text(json.dumps(document))
    tinkops("hardware", "push", "-f", str(tmp_path / "second.json"), *repo_of(home))

    deleted = tinkops("hardware", "delete", "second", "08-00-27-00-00-01", *repo_of(home))
    again = tinkops("hardware", "delete", "second", *repo_of(home), check=False)

    assert deleted.stdout.splitlines()[:2] == ["Deleted\tsecond", f"Deleted\t{MACHINE1_ID}"]
    assert git(home, "log", "-1", "--format=%s", "main").strip() == (
        "Remove hardware records second, machine1"
    )
    assert again.returncode == 1
    assert "hardware 'second' not found" in one_line_error(again)


# --- template -------------------------------------------------------------------------------


def test_template_create_from_file(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "wipe.yaml"
    path.write_text(template_text("wipe"))

    result = tinkops("template", "create", "--file", str(path), *repo_of(home))

    assert result.stdout.splitlines()[0] == "Created Template:  wipe"
    assert git(home, "show", "main:templates/wipe.yaml") == path.read_text()
    assert git(home, "log", "-1", "--format=%s", "main").strip() == "Add template wipe"


def test_template_create_from_stdin(home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tinkops.cli", "template", "create", *repo_of(home)],
        input=template_text("from-stdin"),
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "Created Template:  from-stdin" in result.stdout


def test_template_create_lists_every_problem(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        template_text("bad").replace("busybox:latest", "Busybox") + "        on_failure: [x]\n"
    )
    before = main_tip(home)

    result = tinkops("template", "create", "-f", str(path), *repo_of(home), check=False)

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:9: tasks[0].actions[0].image: 'Busybox'")
    assert "unknown key 'on_failure'; did you mean 'on-failure'?" in lines[1]
    assert lines[2] == (
        "tinkops: template bad rejected, nothing committed: 2 problems; fix them and run again"
    )
    assert main_tip(home) == before


def test_template_create_existing_rejected(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "hello.yaml"
    path.write_text(template_text("hello-world"))

    result = tinkops("template", "create", "-f", str(path), *repo_of(home), check=False)

    assert result.returncode == 1
    assert "template 'hello-world' already exists" in one_line_error(result)
    assert "tinkops template update hello-world" in result.stderr


def test_template_create_missing_file(home: Path, tmp_path: Path) -> None:
    result = tinkops(
        "template", "create", "-f", str(tmp_path / "absent.yaml"), *repo_of(home), check=False
    )

    assert result.returncode == 1
    assert "cannot read" in one_line_error(result)


def test_template_update(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "wipe.yaml"
    path.write_text(template_text("wipe"))
    tinkops("template", "create", "-f", str(path), *repo_of(home))
    path.write_text(template_text("wipe", timeout=90))

    updated = tinkops("template", "update", "wipe", "--path", str(path), *repo_of(home))
    unchanged = tinkops("template", "update", "wipe", "-f", str(path), *repo_of(home))

    assert updated.stdout.splitlines()[0] == "Updated Template:  wipe"
    assert "timeout: 90" in git(home, "show", "main:templates/wipe.yaml")
    assert git(home, "log", "-1", "--format=%s", "main").strip() == "Update template wipe"
    assert "Template wipe is unchanged; nothing to commit" in unchanged.stdout


def test_template_update_errors(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(template_text("other"))

    renamed = tinkops(
        "template", "update", "hello-world", "-f", str(path), *repo_of(home), check=False
    )
    unknown = tinkops("template", "update", "nope", "-f", str(path), *repo_of(home), check=False)

    assert renamed.returncode == 1
    assert "declares template 'other', not 'hello-world'" in one_line_error(renamed)
    assert unknown.returncode == 1
    assert "template 'nope' not found" in one_line_error(unknown)


def test_template_update_rejects_invalid(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "hello.yaml"
    path.write_text(template_text("hello-world").replace("timeout: 30", "timeout: soon"))
    before = main_tip(home)

    result = tinkops(
        "template", "update", "hello-world", "-f", str(path), *repo_of(home), check=False
    )

    assert result.returncode == 1
    assert "timeout" in result.stderr.splitlines()[0]
    assert main_tip(home) == before


def test_template_delete_guards_pending_requests(home: Path) -> None:
    create_workflow(home, "uses-hello")

    rejected = tinkops("template", "delete", "hello-world", *repo_of(home), check=False)
    forced = tinkops("template", "delete", "hello-world", "--force", *repo_of(home))

    assert rejected.returncode == 1
    assert "not rendered yet use these templates: uses-hello" in one_line_error(rejected)
    assert forced.stdout.splitlines()[0] == "Deleted\thello-world"
    assert "these requests will fail to render: uses-hello" in forced.stderr
    assert "templates/" not in git(home, "ls-tree", "-r", "--name-only", "main")


def test_template_delete_after_render(home: Path) -> None:
    create_workflow(home, "rendered-1")
    reconcile(home)

    tinkops("template", "delete", "hello-world", *repo_of(home))

    state = tinkops("workflow", "state", "rendered-1", "-o", "json", *repo_of(home)).stdout
    assert fields(state)["Workflow State"] == "PENDING"


def test_template_get_and_list(home: Path) -> None:
    table = tinkops("template", "get", "hello-world", *repo_of(home)).stdout
    listing = tinkops("template", "list", *repo_of(home)).stdout
    quiet = tinkops("template", "list", "-q", *repo_of(home)).stdout
    records = json.loads(tinkops("template", "get", "-o", "json", *repo_of(home)).stdout)

    assert "| ID          | Name        | Created At" in table
    assert "| Template ID | Template Name | Created At" in listing
    assert quiet == "hello-world\n"
    assert records[0]["id"] == "hello-world"
    assert records[0]["file"] == "templates/hello-world.yaml"
    assert 'worker: "{{.device_1}}"' in records[0]["data"]
    assert records[0]["created_at"].endswith("Z")


def test_template_get_raw(home: Path) -> None:
    raw = tinkops("template", "get", "hello-world", "--raw", *repo_of(home)).stdout
    two = tinkops("template", "get", "hello-world", "x", "--raw", *repo_of(home), check=False)

    assert raw == (ROOT / "repo-layout" / "templates" / "hello-world.yaml").read_text()
    assert two.returncode == 1
    assert "pass exactly one NAME" in one_line_error(two)


def test_template_create_on_branch(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "wipe.yaml"
    path.write_text(template_text("wipe"))
    before = main_tip(home)

    result = tinkops("template", "create", "-f", str(path), "--branch", "add-wipe", *repo_of(home))

    assert main_tip(home) == before
    assert "templates/wipe.yaml" in git(home, "ls-tree", "-r", "--name-only", "add-wipe")
    assert "open a pull request from add-wipe into main" in result.stdout


# --- workflow -------------------------------------------------------------------------------


def test_workflow_get_tinkerbell_columns(home: Path) -> None:
    create_workflow(home, "get-1")
    reconcile(home)

    table = tinkops("workflow", "get", "get-1", *repo_of(home)).stdout
    [record] = json.loads(tinkops("workflow", "get", "get-1", "-o", "json", *repo_of(home)).stdout)

    assert "| ID    | Template ID | State   | Created At" in table
    assert record["state"] == "PENDING"
    assert record["workflow"]["tasks"][0]["worker"] == WORKER
    assert record["status"]["actions"][0]["state"] == "PENDING"


def test_workflow_get_unknown_exits_1(home: Path) -> None:
    create_workflow(home, "known")
    reconcile(home)

    result = tinkops("workflow", "get", "known", "unknown", *repo_of(home), check=False)

    assert result.returncode == 1
    assert "known" in result.stdout
    assert "workflow 'unknown' not found" in one_line_error(result)


def test_workflow_list_quiet_and_columns(home: Path) -> None:
    create_workflow(home, "list-1")
    reconcile(home)

    quiet = tinkops("workflow", "list", "-q", *repo_of(home)).stdout
    table = tinkops("workflow", "list", *repo_of(home)).stdout

    assert quiet == "list-1\n"
    assert "| Workflow ID | Template ID | Hardware Device" in table
    assert '{"device_1": "08:00:27:00:00:01"}' in table


def test_state_explains_unrendered_request(home: Path) -> None:
    create_workflow(home, "not-yet")
    pending = tinkops("workflow", "state", "not-yet", *repo_of(home), check=False)
    tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        '{"device_1": "aa:bb:cc:dd:ee:ff"}',
        "--id",
        "orphan",
        *repo_of(home),
    )
    reconcile(home)
    failed = tinkops("workflow", "events", "orphan", *repo_of(home), check=False)

    assert pending.returncode == 1
    assert "workflow 'not-yet' is not rendered yet" in one_line_error(pending)
    assert failed.returncode == 1
    assert "workflow 'orphan' was not rendered: " in one_line_error(failed)
    assert "no hardware record owns 'aa:bb:cc:dd:ee:ff'" in failed.stderr


def test_workflow_create_with_values(home: Path) -> None:
    tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        DEVICE,
        "--values",
        '{"image_url": "http://10.0.0.1/jammy.raw"}',
        "--id",
        "with-values",
        *repo_of(home),
    )
    bad = tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        DEVICE,
        "--values",
        "[1]",
        *repo_of(home),
        check=False,
    )

    request = git(home, "show", "main:workflows/with-values.yaml")
    assert "values:\n  image_url: http://10.0.0.1/jammy.raw\n" in request
    assert bad.returncode == 1
    assert "--values must be a JSON object" in one_line_error(bad)


def test_delete_pending_cancels_then_removes(home: Path) -> None:
    create_workflow(home, "del-1")
    reconcile(home)

    cancelling = tinkops("workflow", "delete", "del-1", *repo_of(home))
    request = git(home, "show", "main:workflows/del-1.yaml")
    subject = git(home, "log", "-1", "--format=%s", "main").strip()
    repeated = tinkops("workflow", "delete", "del-1", *repo_of(home))
    reconcile(home)
    state = fields(tinkops("workflow", "state", "del-1", "-o", "json", *repo_of(home)).stdout)
    deleted = tinkops("workflow", "delete", "del-1", *repo_of(home))

    assert cancelling.stdout.startswith("Cancelling\tdel-1\tPENDING: workflows/del-1.yaml")
    assert request.endswith("cancel: true\n")
    assert request.startswith("template: hello-world\n")
    assert subject == "Cancel workflow del-1"
    assert "already has cancel: true" in repeated.stdout
    assert state["Workflow State"] == "CANCELLED"
    assert deleted.stdout.startswith("Deleted\tdel-1\tCANCELLED: workflows/del-1.yaml removed")
    assert "workflows/del-1.yaml" not in git(home, "ls-tree", "-r", "--name-only", "main")


def test_deleted_workflow_kept_out_of_list(home: Path) -> None:
    create_workflow(home, "gone")
    create_workflow(home, "kept")
    reconcile(home)
    tinkops("workflow", "delete", "gone", *repo_of(home))
    reconcile(home)
    tinkops("workflow", "delete", "gone", *repo_of(home))

    listed = tinkops("workflow", "list", "-q", *repo_of(home)).stdout
    everything = tinkops("workflow", "list", "-q", "--all", *repo_of(home)).stdout
    gone = tinkops("workflow", "get", "gone", "-o", "json", *repo_of(home)).stdout

    assert listed.split() == ["kept"]
    assert everything.split() == ["gone", "kept"]
    assert json.loads(gone)[0]["state"] == "CANCELLED"


def test_delete_unrendered_removes_request(home: Path) -> None:
    create_workflow(home, "early")

    result = tinkops("workflow", "delete", "early", *repo_of(home))

    assert result.stdout.startswith("Deleted\tearly\tworkflows/early.yaml removed before")
    assert "workflows/" not in git(home, "ls-tree", "-r", "--name-only", "main")
    reconcile(home)
    assert GitRepo(home / "repository.git").rev_parse("refs/tinkops/workflows/early") is None


def test_delete_restores_removed_request_to_cancel(home: Path) -> None:
    create_workflow(home, "orphaned")
    reconcile(home)
    # Someone removed the request of a workflow that is still pending.
    commit_file(GitRepo(home / "repository.git"), "workflows/orphaned.yaml", None, "Remove\n")

    result = tinkops("workflow", "delete", "orphaned", *repo_of(home))
    reconcile(home)

    assert result.stdout.startswith("Cancelling\torphaned")
    assert git(home, "show", "main:workflows/orphaned.yaml").endswith("cancel: true\n")
    state = fields(tinkops("workflow", "state", "orphaned", "-o", "json", *repo_of(home)).stdout)
    assert state["Workflow State"] == "CANCELLED"


def test_delete_unknown_commits_nothing(home: Path) -> None:
    create_workflow(home, "real")
    before = main_tip(home)

    result = tinkops("workflow", "delete", "real", "ghost", *repo_of(home), check=False)

    assert result.returncode == 1
    assert "workflow 'ghost' not found" in one_line_error(result)
    assert main_tip(home) == before


def test_rerun_commits_new_request(home: Path) -> None:
    tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        DEVICE,
        "--values",
        '{"size": "10"}',
        "--id",
        "base",
        *repo_of(home),
    )
    reconcile(home)

    first = tinkops("workflow", "rerun", "base", *repo_of(home))
    reconcile(home)
    second = tinkops("workflow", "rerun", "base-rerun-1", *repo_of(home))

    assert first.stdout.splitlines()[0] == "Created Workflow:  base-rerun-1"
    assert second.stdout.splitlines()[0] == "Created Workflow:  base-rerun-2"
    request = git(home, "show", "main:workflows/base-rerun-1.yaml")
    assert request == (
        "template: hello-world\nhardware_map:\n  device_1: 08:00:27:00:00:01\n"
        "values:\n  size: '10'\n"
    )
    message = git(home, "log", "-1", "--format=%B", "main^")
    assert message.startswith("Rerun workflow base as base-rerun-1\n")
    assert "Rerun-Of: base" in message


def test_rerun_errors(home: Path) -> None:
    create_workflow(home, "src")
    unrendered = tinkops("workflow", "rerun", "src", *repo_of(home), check=False)
    reconcile(home)
    duplicate = tinkops("workflow", "rerun", "src", "--id", "src", *repo_of(home), check=False)

    assert unrendered.returncode == 1
    assert "workflow 'src' is not rendered yet" in one_line_error(unrendered)
    assert duplicate.returncode == 1
    assert "workflow src already exists" in one_line_error(duplicate)


def test_timeline_lists_request_and_events(home: Path) -> None:
    create_workflow(home, "story")
    reconcile(home)
    tinkops("workflow", "delete", "story", *repo_of(home))
    reconcile(home)

    rows = json.loads(tinkops("workflow", "timeline", "story", "-o", "json", *repo_of(home)).stdout)

    assert [row["what"] for row in rows] == [
        "Request workflow story from template hello-world",
        "Create workflow story from template hello-world",
        "Cancel workflow story",
        "CANCELLED workflow story",
    ]
    assert rows[0]["who"] == "Test Operator"
    assert rows[1]["who"] == "tinkops reconciler"
    assert rows[0]["since_previous"] == ""
    assert rows[1]["since_previous"].startswith("+")
    assert rows[0]["time"].endswith("Z")


def test_timeline_unknown(home: Path) -> None:
    result = tinkops("workflow", "timeline", "nope", *repo_of(home), check=False)

    assert result.returncode == 1
    assert "workflow 'nope' not found" in one_line_error(result)


def test_watch_exit_codes_without_agent(home: Path) -> None:
    create_workflow(home, "idle")
    reconcile(home)
    timed_out = tinkops(
        "workflow", "watch", "idle", "--timeout", "0.5", *repo_of(home), check=False
    )
    tinkops("workflow", "delete", "idle", *repo_of(home))
    reconcile(home)
    cancelled = tinkops("workflow", "watch", "idle", *repo_of(home), check=False)
    unknown = tinkops("workflow", "watch", "nope", *repo_of(home), check=False)

    assert timed_out.returncode == 1
    assert "workflow idle is still PENDING after --timeout" in one_line_error(timed_out)
    assert cancelled.returncode == 1
    assert "Workflow idle ended CANCELLED" in cancelled.stdout
    assert "CANCELLED workflow idle: cancelled by request" in cancelled.stdout
    assert unknown.returncode == 1
    assert "workflow 'nope' not found" in one_line_error(unknown)


def test_watch_waits_for_render(home: Path) -> None:
    create_workflow(home, "later")

    result = tinkops("workflow", "watch", "later", "--timeout", "0.5", *repo_of(home), check=False)

    assert result.returncode == 1
    assert "Waiting for the provisioner to render workflows/later.yaml" in result.stdout
    assert "workflow later was not rendered in time" in one_line_error(result)


# --- the command line itself ----------------------------------------------------------------


@pytest.mark.parametrize("group", ["workflow", "template", "hardware"])
def test_help_has_no_bool_placeholder(group: str) -> None:
    top = tinkops("--help").stdout
    result = tinkops(group, "--help").stdout

    assert "<bool>" not in top
    assert "<bool>" not in result
    assert "--help  Show this message and exit." in result


def test_every_command_listed_in_help() -> None:
    groups = {
        "workflow": [
            "create",
            "get",
            "list",
            "state",
            "events",
            "data",
            "watch",
            "timeline",
            "delete",
            "rerun",
        ],
        "template": ["create", "get", "list", "update", "delete"],
        "hardware": ["push", "get", "list", "id", "mac", "ip", "delete"],
    }
    for group, commands in groups.items():
        listing = tinkops(group, "--help").stdout
        for command in commands:
            assert f"\n  {command} " in listing, (group, command)


def test_reading_commands_take_repo_and_output() -> None:
    for args in (
        ("workflow", "get"),
        ("workflow", "list"),
        ("workflow", "state"),
        ("workflow", "events"),
        ("workflow", "timeline"),
        ("template", "get"),
        ("template", "list"),
        ("hardware", "get"),
        ("hardware", "list"),
        ("hardware", "mac"),
        ("hardware", "ip"),
    ):
        text = tinkops(*args, "--help").stdout
        assert "--repo PATH" in text, args
        assert "-o, --output, --format <table|json|yaml>" in text, args


def test_shell_completion_script() -> None:
    result = tinkops("--show-completion", "bash")

    assert "_TINKOPS_COMPLETE" in result.stdout


def test_usage_errors_exit_2(home: Path) -> None:
    missing = tinkops("workflow", "create", *repo_of(home), check=False)
    unknown = tinkops("hardware", "list", "--bogus", check=False)

    assert missing.returncode == 2
    assert "Missing option '--template'" in missing.stderr
    assert unknown.returncode == 2


# --- in an operator's clone, over SSH, with real agents ------------------------------------


@pytest.fixture
def served(tmp_path: Path, openssh_client: str) -> Iterator[Served]:
    provisioner = serve(tmp_path / "provisioner")
    yield provisioner
    provisioner.stop()


def test_clone_watch_success_and_failure(served: Served, tmp_path: Path) -> None:
    clone = served.clone(tmp_path / "operator")
    repo = ["--repo", str(clone)]
    failing = tmp_path / "fails.yaml"
    failing.write_text(template_text("fails", script="echo broken; exit 3"))
    tinkops("template", "create", "-f", str(failing), *repo)
    served.start_agent(tmp_path / "agent", runtime="process")

    tinkops("workflow", "create", "-t", "hello-world", "-r", DEVICE, "--id", "ok-1", *repo)
    tinkops("workflow", "create", "-t", "fails", "-r", DEVICE, "--id", "bad-1", *repo)
    ok = tinkops("workflow", "watch", "ok-1", "--interval", "0.2", *repo, timeout=120, check=False)
    bad = tinkops(
        "workflow", "watch", "bad-1", "--interval", "0.2", *repo, timeout=120, check=False
    )

    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Workflow ok-1 ended SUCCESS" in ok.stdout
    assert "SUCCESS   hello-world/write-data on 08:00:27:00:00:01" in ok.stdout
    assert bad.returncode == 1
    assert "Workflow bad-1 ended FAILED" in bad.stdout
    assert "FAILED    main/step on 08:00:27:00:00:01" in bad.stdout
    pushed = run_git(["-C", str(served.repository), "log", "--format=%s", "main"])
    assert "Request workflow bad-1 from template fails" in pushed
    assert "Add template fails" in pushed

    rerun = tinkops("workflow", "rerun", "ok-1", *repo)
    watched = tinkops("workflow", "watch", "ok-1-rerun-1", *repo, timeout=120, check=False)
    assert "(pushed to origin)" in rerun.stdout
    assert watched.returncode == 0, watched.stdout + watched.stderr


def test_clone_branch_and_no_push(served: Served, tmp_path: Path) -> None:
    clone = served.clone(tmp_path / "operator")
    repo = ["--repo", str(clone)]
    main_before = run_git(["-C", str(served.repository), "rev-parse", "main"])

    on_branch = tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        DEVICE,
        "--id",
        "pr-1",
        "--branch",
        "request-pr-1",
        *repo,
    )
    local = tinkops(
        "workflow",
        "create",
        "-t",
        "hello-world",
        "-r",
        DEVICE,
        "--id",
        "local-1",
        "--no-push",
        *repo,
    )

    assert "on branch request-pr-1 (pushed to origin)" in on_branch.stdout
    assert "on branch main (not pushed; push it with 'git push origin main')" in local.stdout
    assert run_git(["-C", str(served.repository), "rev-parse", "main"]) == main_before
    files = run_git(["-C", str(served.repository), "ls-tree", "-r", "--name-only", "request-pr-1"])
    assert "workflows/pr-1.yaml" in files
    assert "workflows/local-1.yaml" in run_git(
        ["-C", str(clone), "ls-tree", "-r", "--name-only", "main"]
    )
