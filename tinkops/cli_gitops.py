"""The GitOps verbs: ``validate`` (for pre-commit hooks and pull requests) and ``diff``.

``validate`` exits 0 when there is no problem, 1 when there is one (each printed on its own
line, ``file:line: field: what is wrong; the fix``) and 2 on a usage mistake, such as a
target that is neither a folder nor a revision. ``diff`` exits 0 when every request it
lists renders and 1 when one would fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from tinkops.cli_common import Output, OutputOption, console, open_repo
from tinkops.errors import TinkopsError
from tinkops.gitops import fetch_workflow_refs
from tinkops.repository import FOLDERS, Snapshot, SnapshotReader, read_folder
from tinkops.validation import (
    MergeEntry,
    MergeStatus,
    changed_files,
    check_snapshot,
    plan_merge,
)
from tinkops.workflows import list_workflow_ids
from tinkops.yamltext import dump
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import Workflow

RepoPathOption = Annotated[
    Path | None,
    typer.Option(
        "--repo",
        envvar="TINKOPS_REPO",
        help="check a revision of this repository (a clone, or a provisioner home)",
    ),
]


def usage_error(message: str) -> NoReturn:
    print(f"tinkops: {message}", file=sys.stderr)
    raise typer.Exit(2)


def validate(
    target: Annotated[
        str,
        typer.Argument(
            help="a folder to check as it is on disk (a work tree), or a revision "
            "(HEAD, main, a commit) of the repository"
        ),
    ] = ".",
    repo_path: RepoPathOption = None,
    changed: Annotated[
        str | None,
        typer.Option(
            "--changed",
            metavar="BASE",
            help="report only problems that involve files changed since BASE (a pull "
            "request's base); cross-file checks still read the whole tree",
        ),
    ] = None,
) -> None:
    """Check the repository and list every problem.

    Hardware, templates and requests are checked; each problem names its file and line.
    """
    snapshot, repo = _read_target(target, repo_path)
    changes = _changes_since(repo, changed, snapshot) if changed else None

    report = check_snapshot(snapshot, changes)
    problems = report.problems(changes)
    for problem in problems:
        typer.echo(str(problem))
    counts = ", ".join(
        [
            _count(len(snapshot.hardware), "hardware record"),
            _count(len(snapshot.templates), "template"),
            _count(len(snapshot.requests), "request"),
        ]
    )
    scope = f" ({len(changes)} files changed since {changed})" if changes is not None else ""
    if problems:
        files = _count(len({problem.file for problem in problems}), "file")
        print(f"tinkops: {_count(len(problems), 'problem')} in {files}{scope}", file=sys.stderr)
        raise typer.Exit(1)
    print(f"tinkops: no problems in {counts}{scope}", file=sys.stderr)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _read_target(target: str, repo_path: Path | None) -> tuple[Snapshot, GitRepo | None]:
    folder = Path(target)
    if repo_path is None and folder.is_dir():
        repo = GitRepo(folder)
        inside_git = repo.execute("rev-parse", "--git-dir").returncode == 0
        if any((folder / name).exists() for name in FOLDERS):
            return read_folder(folder), repo if inside_git else None
        # A bare repository or a provisioner home has no work tree: check its HEAD.
        try:
            open_repo(folder)
        except TinkopsError:
            usage_error(
                f"{folder} has no hardware/, templates/ or workflows/ folder; pass the "
                "root of the infrastructure repository"
            )
        repo_path, target = folder, "HEAD"
    repo = open_repo(repo_path or Path("."))
    revision = "HEAD" if target == "." else target
    commit = repo.rev_parse(revision)
    if commit is None:
        usage_error(
            f"{target!r} is neither a folder nor a revision of {repo.path}; "
            "pass a folder, or a branch or commit with --repo"
        )
    return SnapshotReader(repo).read(commit), repo


def _changes_since(repo: GitRepo | None, base: str, head: Snapshot) -> set[str]:
    """Return the files that differ between the merge base of ``base`` and ``head``."""
    if repo is None:
        usage_error("--changed needs a git repository; this folder is not inside one")
    base_commit = repo.rev_parse(base)
    if base_commit is None:
        usage_error(f"--changed {base!r} is not a revision of {repo.path}")
    head_commit = head.commit if repo.rev_parse(head.commit) else repo.rev_parse("HEAD")
    if head_commit is not None:
        merge_base = repo.execute("merge-base", base_commit, head_commit).stdout.decode().strip()
        base_commit = merge_base or base_commit
    return changed_files(SnapshotReader(repo).read(base_commit), head)


def diff(
    revisions: Annotated[
        str,
        typer.Argument(
            metavar="BASE..HEAD",
            help="the main branch and the change to merge into it, e.g. main..my-branch",
        ),
    ],
    repo_path: Annotated[
        Path,
        typer.Option(
            "--repo",
            envvar="TINKOPS_REPO",
            help="the infrastructure repository: a clone, or a provisioner home",
        ),
    ] = Path("."),
    output: OutputOption = Output.TABLE,
    fetch: Annotated[
        bool, typer.Option("--fetch/--no-fetch", help="fetch rendered workflows from origin")
    ] = True,
) -> None:
    """Show what merging a change would render.

    Lists the workflows that merging HEAD would render, and the requests that would fail.
    """
    base_name, separator, head_name = revisions.partition("..")
    head_name = head_name.lstrip(".") or "HEAD"
    if not separator or not base_name:
        usage_error(f"{revisions!r} is not BASE..HEAD; write it like main..my-branch")
    repo = open_repo(repo_path)
    base_commit, head_commit = repo.rev_parse(base_name), repo.rev_parse(head_name)
    if base_commit is None or head_commit is None:
        missing = base_name if base_commit is None else head_name
        usage_error(f"{missing!r} is not a revision of {repo.path}")
    if fetch:
        fetch_workflow_refs(repo)

    merge_base = repo.execute("merge-base", base_commit, head_commit).stdout.decode().strip()
    base = SnapshotReader(repo).read(merge_base or base_commit)
    head = SnapshotReader(repo).read(head_commit)
    entries = plan_merge(base, head, set(list_workflow_ids(repo)))

    if output is Output.TABLE:
        _print_entries(entries)
    else:
        records = [_entry_record(entry) for entry in entries]
        if output is Output.JSON:
            typer.echo(json.dumps(records, indent=2))
        else:
            typer.echo(dump(records), nl=False)
    if any(entry.status == MergeStatus.FAILS for entry in entries):
        raise typer.Exit(1)


def _print_entries(entries: list[MergeEntry]) -> None:
    if not entries:
        console.print("No request to render: the change adds or affects none.", markup=False)
    for entry in entries:
        if entry.status == MergeStatus.RENDERS and entry.workflow is not None:
            _print_workflow(entry.workflow)
        elif entry.status == MergeStatus.FAILS:
            console.print(f"! workflow {entry.id} ({entry.file}) would fail:", markup=False)
            for problem in entry.problems:
                console.print(f"    {problem}", markup=False)
        else:
            console.print(
                f"= workflow {entry.id} ({entry.file}) is already rendered; "
                "a rendered workflow never changes, so this change has no effect",
                markup=False,
            )


def _print_workflow(workflow: Workflow) -> None:
    timeout = workflow.global_timeout or "none"
    console.print(
        f"+ workflow {workflow.id} ({workflow.request}) from template {workflow.template}, "
        f"global_timeout {timeout}",
        markup=False,
    )
    for task in workflow.tasks:
        console.print(f"    task {task.name} on {task.worker}", markup=False)
        for action in task.actions:
            line = f"      {action.name}: {action.image}"
            if action.timeout:
                line += f" (timeout {action.timeout} s)"
            console.print(line, markup=False)
            if action.command is not None:
                console.print(f"        command: {json.dumps(list(action.command))}", markup=False)


def _entry_record(entry: MergeEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "file": entry.file,
        "status": entry.status,
        "workflow": entry.workflow.to_dict() if entry.workflow else None,
        "problems": [str(problem) for problem in entry.problems],
    }
