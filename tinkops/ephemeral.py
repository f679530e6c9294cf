"""Versions of a workflow's ephemeral data, read from its ref's history.

Every commit that changed ``ephemeral/`` is one version, numbered from 1 in the order they
were written; each carries who wrote it (the event's worker and action) and when.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tinkops.errors import NotFound
from tinkops_agent.eventlog import read_ephemeral
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import EPHEMERAL_DIR, parse_trailers, workflow_ref


@dataclass(frozen=True)
class DataVersion:
    number: int
    commit: str
    worker: str
    task: str
    action: str
    written_at: str


def data_versions(repo: GitRepo, workflow_id: str) -> list[DataVersion]:
    """Return every version of the workflow's ephemeral data, oldest first."""
    ref = workflow_ref(workflow_id)
    out = repo.text("log", "--reverse", "--format=%H", ref, "--", EPHEMERAL_DIR)
    versions = []
    for number, commit in enumerate(out.split(), start=1):
        message = repo.text("log", "-1", "--format=%B", commit)
        trailers = parse_trailers(message)
        versions.append(
            DataVersion(
                number=number,
                commit=commit,
                worker=trailers.get("Worker", ""),
                task=trailers.get("Task", ""),
                action=trailers.get("Action", ""),
                written_at=trailers.get("Created-At", ""),
            )
        )
    return versions


def read_version(
    repo: GitRepo, workflow_id: str, version: int | None, file: str
) -> tuple[DataVersion, bytes]:
    """Return version ``version`` (None: the latest) of one ephemeral file, with its metadata."""
    versions = data_versions(repo, workflow_id)
    if not versions:
        raise NotFound(f"workflow {workflow_id} has no ephemeral data yet")
    if version is None:
        chosen = versions[-1]
    elif 1 <= version <= len(versions):
        chosen = versions[version - 1]
    else:
        raise NotFound(
            f"workflow {workflow_id} has data versions 1 to {len(versions)}, not {version}"
        )
    files = read_ephemeral(repo, chosen.commit)
    if file not in files:
        known = ", ".join(sorted(files)) or "none"
        raise NotFound(
            f"version {chosen.number} of workflow {workflow_id} has no file "
            f"{file!r} (files: {known})"
        )
    return chosen, files[file]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
