"""Validating a snapshot of the repository, and what merging a change would render.

``check_snapshot`` is what ``tinkops validate`` reports: every problem of every file
(found while reading the snapshot, the same list the reconciler records as invalid files),
plus every request that would not render (the same ``plan_workflow`` the reconciler runs).
Each problem carries the files whose content produced it, so a pull request's check can
keep only the problems that its changed files are part of.

``plan_merge`` is what ``tinkops diff`` shows: for each request that a change adds or
affects and that has no workflow yet, the workflow it would render or why it would fail.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

from tinkops.errors import InvalidContent, Problem
from tinkops.planner import plan_workflow
from tinkops.repository import HARDWARE_DIR, TEMPLATES_DIR, WORKFLOWS_DIR, Snapshot
from tinkops.request import WorkflowRequest
from tinkops_agent.protocol import Workflow, canonical_worker

# A path of the repository named inside a problem's message (``already owned by ...``).
_PATH_IN_MESSAGE = re.compile(r"\b(?:hardware|templates|workflows)/[A-Za-z0-9._-]+")
_RENDERED_FOR = re.compile(r" \(render(?:ed|ing) for [^)]*\)")


@dataclass(frozen=True)
class Finding:
    """A problem, and the repository files whose content it depends on.

    A source ending in ``/`` stands for every file of that folder (a request whose device
    no record owns depends on all hardware records).
    """

    problem: Problem
    sources: frozenset[str]

    def touches(self, changed: Collection[str]) -> bool:
        for source in self.sources:
            if source.endswith("/"):
                if any(path.startswith(source) for path in changed):
                    return True
            elif source in changed:
                return True
        return False


@dataclass
class Report:
    """Every finding of one snapshot, with the workflows its requests render to."""

    findings: list[Finding] = field(default_factory=list)
    workflows: dict[str, Workflow] = field(default_factory=dict)
    failed: dict[str, list[Problem]] = field(default_factory=dict)

    def problems(self, changed: Collection[str] | None = None) -> list[Problem]:
        """Return the problems, sorted by file and line; only those of ``changed`` files."""
        selected = [f.problem for f in self.findings if changed is None or f.touches(changed)]
        unique = list(dict.fromkeys(selected))
        return sorted(unique, key=lambda p: (p.file, p.line or 0, p.field, p.message))


def check_snapshot(snapshot: Snapshot, changed: Collection[str] | None = None) -> Report:
    """Check every file of ``snapshot`` and render every request (or those ``changed`` affects)."""
    report = Report()
    for problem in snapshot.problems:
        report.findings.append(Finding(problem, _sources(problem, {problem.file})))

    template_problems = {_plain(p) for p in snapshot.problems if p.file.startswith(TEMPLATES_DIR)}
    for request in sorted(snapshot.requests.values(), key=lambda r: r.file):
        sources = request_sources(snapshot, request)
        if changed is not None and not Finding(_NO_PROBLEM, sources).touches(changed):
            continue
        try:
            report.workflows[request.id] = plan_workflow(snapshot, request, created_at="")
        except InvalidContent as error:
            report.failed[request.id] = error.problems
            report.findings += _request_findings(
                request, error.problems, sources, template_problems
            )
    return report


_NO_PROBLEM = Problem("", None, "", "")


def request_sources(snapshot: Snapshot, request: WorkflowRequest) -> frozenset[str]:
    """Return the files a request's rendering depends on."""
    sources = {request.file}
    template = snapshot.template(request.template)
    if template is not None:
        sources.add(template.file)
    else:
        sources.add(f"{TEMPLATES_DIR}/")
    for worker in request.hardware_map.values():
        record = snapshot.workers.get(canonical_worker(worker))
        sources.add(record.file if record is not None else f"{HARDWARE_DIR}/")
    return frozenset(sources)


def _request_findings(
    request: WorkflowRequest,
    problems: Iterable[Problem],
    sources: frozenset[str],
    template_problems: set[Problem],
) -> list[Finding]:
    """Return a request's findings, naming its template's own problems only once."""
    findings: list[Finding] = []
    inherited: set[str] = set()
    for problem in problems:
        if _plain(problem) in template_problems:
            inherited.add(problem.file)
            continue
        findings.append(Finding(problem, _sources(problem, sources)))
    for file in sorted(inherited):
        summary = Problem(
            request.file,
            request.lines.get("template"),
            "template",
            f"does not render because {file} has problems (listed for that file)",
            f"fix {file}",
        )
        findings.append(Finding(summary, sources))
    return findings


def _plain(problem: Problem) -> Problem:
    """Return ``problem`` without the request it was rendered for."""
    return Problem(
        problem.file,
        problem.line,
        problem.field,
        _RENDERED_FOR.sub("", problem.message),
        problem.fix,
    )


def _sources(problem: Problem, sources: Iterable[str]) -> frozenset[str]:
    named = _PATH_IN_MESSAGE.findall(problem.message)
    return frozenset({problem.file, *sources, *named})


def changed_files(base: Snapshot, head: Snapshot) -> set[str]:
    """Return every repository file that differs between two snapshots (added, changed, gone)."""
    paths = set(base.blobs) | set(head.blobs)
    changed = {path for path in paths if base.blobs.get(path) != head.blobs.get(path)}
    # Files that were not read (links, sub-folders) differ if their problems do.
    for problem in {*base.problems, *head.problems}:
        if problem.file not in base.blobs and problem.file not in head.blobs:
            before = {str(p) for p in base.problems_of(problem.file)}
            after = {str(p) for p in head.problems_of(problem.file)}
            if before != after:
                changed.add(problem.file)
    return changed


class MergeStatus:
    RENDERS = "renders"
    FAILS = "fails"
    ALREADY_RENDERED = "already rendered"


@dataclass(frozen=True)
class MergeEntry:
    """The effect of merging on one request."""

    id: str
    file: str
    status: str
    workflow: Workflow | None = None
    problems: tuple[Problem, ...] = ()


def plan_merge(base: Snapshot, head: Snapshot, rendered: Collection[str]) -> list[MergeEntry]:
    """Return what merging ``head`` into ``base`` would render.

    A request is listed when its file, its template or its hardware changed. One that
    already has a workflow (``rendered``) is listed as such, because a rendered workflow
    never changes.
    """
    changed = changed_files(base, head)
    entries: list[MergeEntry] = []
    for request in head.requests.values():
        sources = request_sources(head, request)
        if not Finding(_NO_PROBLEM, sources).touches(changed):
            continue
        entry = MergeEntry(request.id, request.file, MergeStatus.ALREADY_RENDERED)
        if request.id in rendered:
            if request.file in changed:
                entries.append(entry)
            continue
        try:
            workflow = plan_workflow(head, request, created_at="")
        except InvalidContent as error:
            failed = replace(entry, status=MergeStatus.FAILS, problems=tuple(error.problems))
            entries.append(failed)
            continue
        entries.append(replace(entry, status=MergeStatus.RENDERS, workflow=workflow))
    entries += _unreadable_requests(head, changed, rendered)
    return sorted(entries, key=lambda entry: entry.file)


def _unreadable_requests(
    head: Snapshot, changed: Collection[str], rendered: Collection[str]
) -> list[MergeEntry]:
    """Return an entry for each changed request file of ``head`` that could not be read."""
    read = {request.file for request in head.requests.values()}
    entries = []
    for path in sorted(changed):
        if not path.startswith(f"{WORKFLOWS_DIR}/") or path in read:
            continue
        problems = tuple(head.problems_of(path))
        stem = path.rpartition("/")[2].rpartition(".")[0]
        if problems and stem not in rendered:
            entries.append(MergeEntry(stem, path, MergeStatus.FAILS, problems=problems))
    return entries
