"""Operating the provisioner: ``tinkops reconcile`` and ``tinkops status``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tinkops.cli_common import Output, OutputOption, RepoOption, console, open_repo, show
from tinkops.errors import TinkopsError
from tinkops.gitops import fetch_workflow_refs, has_origin
from tinkops.observe import collect_status
from tinkops.reconciler import Reconciler, read_status
from tinkops.views import Rows
from tinkops_agent.gitrepo import GitRepo

BranchOption = Annotated[str, typer.Option(help="the main branch's name")]


def reconcile(
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            help="run one pass here, in this process, "
            "instead of waiting for the running provisioner",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the provisioner")] = 60.0,
    branch: BranchOption = "main",
    repo_path: RepoOption = Path("."),
) -> None:
    """Wait until the provisioner has reconciled main.

    Exits 0 once the status ref names the current tip of main (or a later commit), 1 on
    timeout. With --once, run one pass against a local bare repository instead.
    """
    repo = open_repo(repo_path)
    if once:
        result = Reconciler(repo, branch).reconcile()
        console.print(
            f"Reconciled {branch} at {(result.commit or 'nothing')[:12]}: "
            f"{len(result.created)} workflow(s) rendered, {len(result.failed)} "
            f"request(s) failed",
            markup=False,
        )
        return

    remote = has_origin(repo)
    if remote:
        repo.run("fetch", "--quiet", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
    target = repo.rev_parse(f"refs/remotes/origin/{branch}" if remote else f"refs/heads/{branch}")
    if target is None:
        raise TinkopsError(f"branch {branch!r} not found")
    deadline = time.monotonic() + timeout
    while True:
        if remote:
            repo.execute("fetch", "--quiet", "origin", "+refs/tinkops/status:refs/tinkops/status")
        handled = read_status(repo, branch).reconciled_commit
        if handled and (handled == target or _contains(repo, handled, target)):
            console.print(f"Reconciled {branch} at {target[:12]}", markup=False)
            return
        if time.monotonic() > deadline:
            raise TinkopsError(
                f"the provisioner has not reconciled {target[:12]} after "
                f"{timeout:.0f} s (last: {(handled or 'none')[:12]}); check "
                "that 'tinkops serve' runs and see its log"
            )
        time.sleep(0.2)


def _contains(repo: GitRepo, descendant: str, ancestor: str) -> bool:
    return repo.rev_parse(descendant) is not None and repo.is_ancestor(ancestor, descendant)


def status(
    output: OutputOption = Output.TABLE,
    branch: BranchOption = "main",
    repo_path: RepoOption = Path("."),
) -> None:
    """Show the reconciler's progress and workflows by state.

    Lists the invalid files and the requests that failed to render too.
    """
    repo = open_repo(repo_path)
    if has_origin(repo):
        repo.execute(
            "fetch", "--quiet", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}"
        )
        fetch_workflow_refs(repo)
    report = collect_status(repo, branch)
    rows = [
        ("Main Commit", (report.main_commit or "")[:12]),
        ("Reconciled Commit", (report.reconciled_commit or "")[:12]),
        ("Commits Behind", str(report.commits_behind)),
        ("Lag", f"{report.lag_seconds:.1f} s"),
        ("Invalid Files", str(len(report.invalid_files))),
        ("Failed Requests", str(len(report.failed_requests))),
    ]
    rows += [(f"Workflows {state}", str(count)) for state, count in report.workflows.items()]
    show(Rows(("Field Name", "Values"), rows), output)
    if output is Output.TABLE:
        for _file, problems in sorted(report.invalid_files.items()):
            for problem in problems:
                console.print(problem, markup=False)
        for workflow_id, problems in sorted(report.failed_requests.items()):
            for problem in problems:
                console.print(f"request {workflow_id}: {problem}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(reconcile)
    app.command()(status)
