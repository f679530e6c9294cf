"""``tinkops validate`` and ``tinkops diff`` on folders and real git repositories."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.harness import run_git, tinkops
from tinkops.repository import read_folder
from tinkops.validation import check_snapshot
from tinkops.yamltext import MAX_FILE_BYTES

GOOD = Path(__file__).parent / "corpus" / "good"
REQUEST = "template: ubuntu-image2disk\nhardware_map:\n  device_1: 0c:c4:7a:10:20:01\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(GOOD, root)
    return root


@pytest.fixture
def clone(folder: Path) -> Path:
    """A git repository whose main branch contains the good corpus."""
    run_git(["init", "-q", "-b", "main", str(folder)])
    run_git(["-C", str(folder), "add", "-A"])
    run_git(["-C", str(folder), "commit", "-q", "-m", "Add the corpus"])
    return folder


def commit_all(repo: Path, message: str) -> None:
    run_git(["-C", str(repo), "add", "-A"])
    run_git(["-C", str(repo), "commit", "-q", "-m", message])


def problems_of(folder: Path) -> list[str]:
    return [str(problem) for problem in check_snapshot(read_folder(folder)).problems()]


# --- hostile input, on disk ------------------------------------------------------------------


def test_oversized_file_not_read(folder: Path) -> None:
    (folder / "hardware" / "huge.yaml").write_bytes(b"#" * MAX_FILE_BYTES + b"\n")
    assert problems_of(folder) == [
        f"hardware/huge.yaml: file is {MAX_FILE_BYTES + 1} bytes, over the limit of "
        f"{MAX_FILE_BYTES}; split it or remove unused content"
    ]


def test_deep_nesting_rejected(folder: Path) -> None:
    (folder / "hardware" / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    [problem] = problems_of(folder)
    assert problem.startswith("hardware/deep.yaml")
    assert "nested" in problem


def test_binary_file_rejected(folder: Path) -> None:
    (folder / "templates" / "blob.yaml").write_bytes(b"\x7fELF\x00\x01\x02")
    assert problems_of(folder) == [
        "templates/blob.yaml: file is binary (contains NUL bytes); store YAML text"
    ]


def test_non_utf8_rejected(folder: Path) -> None:
    (folder / "workflows" / "latin1.yaml").write_bytes(b"template: caf\xe9\n")
    [problem] = problems_of(folder)
    assert problem.startswith("workflows/latin1.yaml: file is not UTF-8 text")


def test_symlinked_file_not_followed(folder: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("id: outside\n")
    (folder / "hardware" / "link.yaml").symlink_to(secret)
    assert problems_of(folder) == [
        "hardware/link.yaml: symbolic links are not read; store the file itself"
    ]


def test_symlinked_folder_not_followed(folder: Path, tmp_path: Path) -> None:
    shutil.move(folder / "workflows", tmp_path / "elsewhere")
    (folder / "workflows").symlink_to(tmp_path / "elsewhere")
    [problem] = problems_of(folder)
    assert problem.startswith("workflows: workflows is a symbolic link")


def test_sub_folder_not_read(folder: Path) -> None:
    (folder / "templates" / "old").mkdir()
    (folder / "templates" / "old" / "x.yaml").write_text("name: x\n")
    assert problems_of(folder) == [
        "templates/old/: files in sub-folders are not read; move it directly under templates/"
    ]


def test_fifo_not_opened(folder: Path) -> None:
    os.mkfifo(folder / "hardware" / "pipe.yaml")
    [problem] = problems_of(folder)
    assert problem.startswith("hardware/pipe.yaml: not a regular file")


@pytest.mark.parametrize("name", ["-dash.yaml", "white space.yaml", "é.yaml"])
def test_bad_file_names_reported(folder: Path, name: str) -> None:
    (folder / "hardware" / name).write_text("id: x\n")
    [problem] = problems_of(folder)
    assert "is not a valid name" in problem


def test_same_name_twice_reported(folder: Path) -> None:
    shutil.copy(folder / "workflows" / "legacy-04.yaml", folder / "workflows" / "legacy-04.yml")
    [problem] = problems_of(folder)
    assert problem.startswith("workflows/legacy-04.yml: workflows/legacy-04.yaml has the same name")


def test_render_loop_stopped(folder: Path) -> None:
    (folder / "templates" / "spin.yaml").write_text(
        "name: spin\n{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}\ntasks: []\n"
    )
    [problem] = problems_of(folder)
    assert problem.startswith("templates/spin.yaml:2: rendering took longer than")


def test_hidden_files_ignored(folder: Path) -> None:
    (folder / "hardware" / ".gitkeep").write_text("")
    assert problems_of(folder) == []


# --- the CLI on revisions --------------------------------------------------------------------


def test_revision_with_symlink_reported(clone: Path) -> None:
    (clone / "templates" / "alias.yaml").symlink_to("ubuntu-image2disk.yaml")
    commit_all(clone, "Add a link")

    result = tinkops("validate", "HEAD", "--repo", str(clone), check=False)

    assert result.returncode == 1
    assert (
        result.stdout
        == "templates/alias.yaml: symbolic links are not read; store the file itself\n"
    )


def test_revision_reads_commit_not_disk(clone: Path) -> None:
    (clone / "workflows" / "uncommitted.yaml").write_text("template: [\n")
    result = tinkops("validate", "main", "--repo", str(clone), check=False)
    assert result.returncode == 0, result.stdout


def test_folder_validates_work_tree(clone: Path) -> None:
    (clone / "workflows" / "uncommitted.yaml").write_text("template: [\n")
    result = tinkops("validate", str(clone), check=False)
    assert result.returncode == 1
    assert result.stdout.startswith("workflows/uncommitted.yaml:2: invalid YAML")


def test_unknown_revision_usage_error(clone: Path) -> None:
    result = tinkops("validate", "no-such-branch", "--repo", str(clone), check=False)
    assert result.returncode == 2
    assert "neither a folder nor a revision" in result.stderr


def test_changed_reports_only_the_change(clone: Path) -> None:
    (clone / "workflows" / "old-broken.yaml").write_text("template: nope\nhardware_map: {}\n")
    commit_all(clone, "An old mistake")
    run_git(["-C", str(clone), "checkout", "-q", "-b", "change"])
    (clone / "workflows" / "new-broken.yaml").write_text("template: nope\nhardware_map: {}\n")
    commit_all(clone, "A new mistake")

    whole = tinkops("validate", "HEAD", "--repo", str(clone), check=False)
    changed = tinkops("validate", "HEAD", "--repo", str(clone), "--changed", "main", check=False)

    assert "workflows/old-broken.yaml" in whole.stdout
    assert changed.returncode == 1
    assert "workflows/old-broken.yaml" not in changed.stdout
    assert "workflows/new-broken.yaml:2: hardware_map: the device map is empty" in changed.stdout


def test_changed_keeps_cross_file_checks(clone: Path) -> None:
    run_git(["-C", str(clone), "checkout", "-q", "-b", "change"])
    record = (clone / "hardware" / "c3-small-02.yaml").read_text()
    (clone / "hardware" / "twin.yaml").write_text(record.replace("7a02", "7aff"))
    commit_all(clone, "Add a twin")

    result = tinkops("validate", "HEAD", "--repo", str(clone), "--changed", "main", check=False)

    assert result.returncode == 1
    assert (
        "hardware/twin.yaml:16: network.interfaces[0].dhcp.mac: 0c:c4:7a:10:20:02 is "
        "already owned by hardware/c3-small-02.yaml" in result.stdout
    )


def test_changed_template_reports_its_requests(clone: Path) -> None:
    run_git(["-C", str(clone), "checkout", "-q", "-b", "change"])
    template = clone / "templates" / "debian-oci2disk.yaml"
    template.write_text(template.read_text().replace("values.image_url", "values.img"))
    commit_all(clone, "Rename a value")

    result = tinkops("validate", "HEAD", "--repo", str(clone), "--changed", "main", check=False)

    assert result.returncode == 1
    assert "'values.img' is undefined (rendering for workflows/debian-c3-small-02.yaml)" in (
        result.stdout
    )


def test_pre_commit_style_folder_run(clone: Path) -> None:
    result = tinkops("validate", ".", cwd=clone, check=False)
    assert result.returncode == 0
    assert "no problems in 4 hardware records, 6 templates, 6 requests" in result.stderr


# --- diff -----------------------------------------------------------------------------------


def test_diff_shows_rendered_workflow(clone: Path) -> None:
    run_git(["-C", str(clone), "checkout", "-q", "-b", "change"])
    (clone / "workflows" / "second.yaml").write_text(REQUEST)
    commit_all(clone, "Request a second install")

    result = tinkops("diff", "main..change", "--repo", str(clone), "--no-fetch")

    assert result.returncode == 0
    assert "+ workflow second (workflows/second.yaml) from template ubuntu-image2disk" in (
        result.stdout
    )
    assert "task os-install on 0c:c4:7a:10:20:01" in result.stdout
    assert "stream-image: quay.io/tinkerbell/actions/image2disk:v1.0.0" in result.stdout
    assert "ubuntu-c3-small-01" not in result.stdout


def test_diff_json_lists_failures(clone: Path) -> None:
    run_git(["-C", str(clone), "checkout", "-q", "-b", "change"])
    (clone / "workflows" / "good.yaml").write_text(REQUEST)
    (clone / "workflows" / "bad.yaml").write_text(REQUEST.replace("ubuntu-image2disk", "nope"))
    (clone / "workflows" / "broken.yaml").write_text("template: [\n")
    commit_all(clone, "Three requests")

    result = tinkops(
        "diff", "main..change", "--repo", str(clone), "--no-fetch", "-o", "json", check=False
    )

    entries = {entry["id"]: entry for entry in json.loads(result.stdout)}
    assert result.returncode == 1
    assert entries["good"]["status"] == "renders"
    assert entries["good"]["workflow"]["tasks"][0]["worker"] == "0c:c4:7a:10:20:01"
    assert entries["bad"]["status"] == "fails"
    assert "template 'nope' not found" in entries["bad"]["problems"][0]
    assert entries["broken"]["status"] == "fails"
    assert "invalid YAML" in entries["broken"]["problems"][0]


def test_diff_usage_error(clone: Path) -> None:
    result = tinkops("diff", "main", "--repo", str(clone), check=False)
    assert result.returncode == 2
    assert "is not BASE..HEAD" in result.stderr


def test_provisioner_home_reads_head(tmp_path: Path) -> None:
    tinkops("init", str(tmp_path / "home"), "--port", "0")
    result = tinkops("validate", str(tmp_path / "home"), check=False)
    assert result.returncode == 0, result.stdout
    assert "1 hardware record, 1 template, 1 request" in result.stderr


def test_empty_folder_usage_error(tmp_path: Path) -> None:
    result = tinkops("validate", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "has no hardware/, templates/ or workflows/ folder" in result.stderr
