"""The reconciler and ``tinkops validate`` agree, and bad files never stop the reconciler."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import tinkops
from tinkops.gitops import commit_files
from tinkops.home import init_home
from tinkops.reconciler import Reconciler, read_status
from tinkops.workflows import list_workflow_ids
from tinkops_agent.gitrepo import GitRepo

GOOD = Path(__file__).parent / "corpus" / "good"
BAD = Path(__file__).parent / "corpus" / "bad"


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repository = GitRepo(tmp_path / "home" / "repository.git")
    files: dict[str, bytes | None] = {
        str(path.relative_to(GOOD)): path.read_bytes() for path in GOOD.glob("*/*")
    }
    commit_files(repository, files, "Add the good corpus\n")
    return repository


def test_bad_request_leaves_others_rendering(repo: GitRepo) -> None:
    bad = {
        "workflows/missing-value.yaml": (BAD / "workflows" / "missing-value.yaml").read_bytes(),
        "workflows/broken.yaml": b"template: [\n",
        "workflows/binary.yaml": b"\x00\x01\x02",
        "templates/action-twice.yaml": (BAD / "templates" / "action-twice.yaml").read_bytes(),
    }
    commit_files(repo, bad, "Push mistakes\n")

    result = Reconciler(repo).reconcile()

    good_requests = {path.stem for path in (GOOD / "workflows").iterdir()}
    assert set(result.created) == good_requests
    assert set(list_workflow_ids(repo)) == good_requests
    assert "'values.image_url' is undefined" in result.failed["missing-value"][0]
    status = read_status(repo, "main")
    assert set(status.invalid_files) == {
        "workflows/broken.yaml",
        "workflows/binary.yaml",
        "templates/action-twice.yaml",
    }


def test_status_matches_validate(repo: GitRepo) -> None:
    commit_files(
        repo,
        {
            "workflows/missing-value.yaml": (BAD / "workflows" / "missing-value.yaml").read_bytes(),
            "hardware/bad-ip.yaml": (BAD / "hardware" / "bad-ip.yaml").read_bytes(),
        },
        "Push mistakes\n",
    )
    Reconciler(repo).reconcile()
    status = read_status(repo, "main")

    result = tinkops("validate", "main", "--repo", str(repo.path), check=False)

    recorded = [line for lines in status.invalid_files.values() for line in lines]
    recorded += [line for lines in status.failed_requests.values() for line in lines]
    assert result.returncode == 1
    assert sorted(result.stdout.splitlines()) == sorted(recorded)


def test_fixed_request_renders_next_pass(repo: GitRepo) -> None:
    request = (BAD / "workflows" / "missing-value.yaml").read_text()
    commit_files(repo, {"workflows/late.yaml": request.encode()}, "Request\n")
    reconciler = Reconciler(repo)
    assert "late" in reconciler.reconcile().failed

    fixed = request + "values:\n  image_url: oci://registry.lab.local/debian:12\n"
    commit_files(repo, {"workflows/late.yaml": fixed.encode()}, "Add the value\n")

    assert reconciler.reconcile().created == ("late",)
