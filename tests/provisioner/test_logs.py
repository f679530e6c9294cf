"""Structured logs: the reconciler's lines carry workflow, request and commit ids."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from tinkops.gitops import commit_file
from tinkops.home import init_home
from tinkops.logs import JsonFormatter
from tinkops.reconciler import Reconciler
from tinkops_agent.gitrepo import GitRepo


def test_rendering_logged_with_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    commit_file(
        repo,
        "workflows/j-1.yaml",
        b"template: hello-world\nhardware_map:\n  device_1: 08:00:27:00:00:01\n",
        "Request j-1\n",
    )
    commit_file(
        repo,
        "workflows/j-2.yaml",
        b"template: missing\nhardware_map:\n  device_1: 08:00:27:00:00:01\n",
        "Request j-2\n",
    )

    with caplog.at_level(logging.INFO, logger="tinkops.reconciler"):
        Reconciler(repo).reconcile()

    lines = [json.loads(JsonFormatter().format(record)) for record in caplog.records]
    rendered = next(line for line in lines if line["message"].startswith("rendered workflow"))
    assert rendered["workflow"] == "j-1"
    assert rendered["request"] == "workflows/j-1.yaml"
    assert rendered["commit"] == repo.rev_parse("refs/tinkops/workflows/j-1")
    assert rendered["level"] == "INFO"
    failed = next(line for line in lines if "not rendered" in line["message"])
    assert failed["workflow"] == "j-2"
    assert failed["level"] == "WARNING"


def test_json_lines_include_errors() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        record = logging.LogRecord(
            "tinkops.x", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed x"
    assert "ValueError: broken" in line["error"]
