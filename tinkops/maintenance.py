"""Keeping a long-lived repository fast: packed refs, git's own upkeep, archived workflows.

One ref per workflow means hundreds of thousands of refs over a fleet's life. Loose refs cost
a file each and slow every lookup, so they are packed once too many pile up. Finished
workflows older than the retention period move from ``refs/tinkops/workflows/`` to
``refs/tinkops/archive/``: they stay readable with plain git (and by id), but the lists that
the reconciler, the CLI and ``tinkops status`` walk stop growing with history.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tinkops_agent.eventlog import parse_time
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import STATE_FILE, WORKFLOW_REF_PREFIX, ProtocolError, WorkflowStatus

log = logging.getLogger(__name__)

ARCHIVE_REF_PREFIX = "refs/tinkops/archive/"
# Past this many loose refs, lookups slow down noticeably (each is a file); packing 100,000
# refs takes about 10 s on the machines the project was measured on, so it is not done often.
LOOSE_REF_LIMIT = 2000


@dataclass(frozen=True)
class MaintenanceResult:
    packed: bool
    archived: tuple[str, ...]


def count_loose_refs(repository: Path) -> int:
    total = 0
    for _root, _dirs, files in os.walk(repository / "refs"):
        total += sum(1 for name in files if not name.endswith(".lock"))
    return total


def archive_finished(
    repo: GitRepo, older_than_days: float, *, now: float | None = None
) -> list[str]:
    """Move finished workflows whose last event is older than the retention to the archive."""
    now = time.time() if now is None else now
    cutoff = now - older_than_days * 86400
    tips = {
        ref[len(WORKFLOW_REF_PREFIX) :]: sha for ref, sha in repo.refs(WORKFLOW_REF_PREFIX).items()
    }
    states = repo.read_objects([f"{sha}:{STATE_FILE}" for sha in tips.values()])
    lines = []
    archived = []
    for workflow_id, sha in sorted(tips.items()):
        raw = states.get(f"{sha}:{STATE_FILE}")
        try:
            status = WorkflowStatus.from_json(raw or b"")
        except ProtocolError:
            continue
        last = status.updated_at or status.started_at
        if not status.state.terminal or not last or parse_time(last) > cutoff:
            continue
        lines.append(f"create {ARCHIVE_REF_PREFIX}{workflow_id} {sha}")
        lines.append(f"delete {WORKFLOW_REF_PREFIX}{workflow_id} {sha}")
        archived.append(workflow_id)
    if not lines:
        return []
    payload = "start\n" + "".join(line + "\n" for line in lines) + "commit\n"
    result = repo.execute("update-ref", "--stdin", input=payload.encode())
    if result.returncode != 0:
        # A workflow moved meanwhile; the next run archives what is still old and finished.
        log.info("archiving skipped: %s", result.stderr.decode(errors="replace").strip())
        return []
    log.info("archived %d finished workflow(s)", len(archived))
    return archived


def maintain(
    repo: GitRepo,
    *,
    archive_after_days: float | None = None,
    loose_ref_limit: int = LOOSE_REF_LIMIT,
    now: float | None = None,
) -> MaintenanceResult:
    """Archive old finished workflows, pack refs when too many are loose, let git tidy up.

    ``archive_after_days`` None keeps every workflow active (the default retention).
    """
    archived = (
        archive_finished(repo, archive_after_days, now=now)
        if archive_after_days is not None
        else []
    )
    packed = False
    if archived or count_loose_refs(repo.path) > loose_ref_limit:
        repo.run("pack-refs", "--all", "--prune")
        packed = True
    # git decides itself whether loose objects or packs have piled up enough to repack.
    repo.execute("gc", "--auto", "--quiet")
    return MaintenanceResult(packed=packed, archived=tuple(archived))


def archived_ids(repo: GitRepo) -> dict[str, str]:
    return {
        ref[len(ARCHIVE_REF_PREFIX) :]: sha for ref, sha in repo.refs(ARCHIVE_REF_PREFIX).items()
    }
