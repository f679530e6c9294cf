"""Reading the repository's git history: when files changed, and a workflow's timeline."""

from __future__ import annotations

from dataclasses import dataclass

from tinkops.views import TimelineEntry, format_time
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import workflow_ref


@dataclass(frozen=True)
class FileDates:
    created_at: str
    updated_at: str


def file_dates(repo: GitRepo, commit: str, folder: str) -> dict[str, FileDates]:
    """Return, for each file under ``folder`` at ``commit``, when it was first and last changed.

    One ``git log`` over the folder serves every file. The creation time is that of the
    oldest commit that touched the path, even if the file was removed and added again since.
    """
    output = repo.text(
        "log", "--format=%x00%at", "--name-only", "--no-renames", commit, "--", folder
    )
    dates: dict[str, list[int]] = {}
    for record in output.split("\0"):
        lines = [line for line in record.splitlines() if line.strip()]
        if not lines:
            continue
        when = int(lines[0])
        for path in lines[1:]:
            seen = dates.setdefault(path, [when, when])
            seen[0] = min(seen[0], when)
            seen[1] = max(seen[1], when)
    return {
        path: FileDates(format_time(first), format_time(last))
        for path, (first, last) in dates.items()
    }


def workflow_timeline(
    repo: GitRepo,
    workflow_id: str,
    request_file: str,
    main: str | None,
    source_commit: str | None = None,
) -> list[TimelineEntry]:
    """Return every commit of a workflow's story, oldest first.

    That is each commit of ``main`` that changed the request file (who asked for the
    workflow, who cancelled or removed it) and each commit of the workflow's ref (the
    rendering, then one per event). git records times in whole seconds, so the order comes
    from the history where it can: the request's commits up to ``source_commit`` (the one
    the workflow was rendered from) come before the rendering. The later ones are merged
    with the events by time, and at equal times the request's commit comes first.
    """
    requests = _log(repo, [main, "--", request_file], "main") if main is not None else []
    workflow: list[TimelineEntry] = []
    if repo.rev_parse(workflow_ref(workflow_id)) is not None:
        workflow = _log(repo, [workflow_ref(workflow_id)], "workflow")
    if not workflow:
        return requests

    before: set[str] = set()
    if source_commit and repo.rev_parse(source_commit) is not None:
        before = set(repo.text("rev-list", source_commit, "--", request_file).split())
    earlier = [entry for entry in requests if entry.commit in before]
    later = [entry for entry in requests if entry.commit not in before]
    order = {"main": 0, "workflow": 1}
    # sorted() is stable, so each source keeps its own order within one second.
    merged = sorted(later + workflow[1:], key=lambda entry: (entry.time, order[entry.source]))
    return [*earlier, workflow[0], *merged]


def _log(repo: GitRepo, args: list[str], source: str) -> list[TimelineEntry]:
    output = repo.text("log", "--reverse", "-z", "--format=%H%x01%at%x01%an%x01%s", *args)
    entries = []
    for record in output.split("\0"):
        if not record.strip():
            continue
        commit, when, author, subject = record.strip("\n").split("\x01", 3)
        entries.append(TimelineEntry(int(when), author, subject, commit, source))
    return entries
