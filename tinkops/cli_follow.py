"""``workflow watch`` and ``workflow timeline``: a workflow over time, read from git.

``watch`` re-reads the workflow's ref (fetching it from ``origin`` in a clone) until the
workflow ends, with a progress bar per action and one line per event. It exits 0 when the
workflow ends SUCCESS and 1 when it ends FAILED, TIMEOUT or CANCELLED, or the wait times out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from tinkops.cli_common import (
    FetchOption,
    NoHeadersOption,
    Output,
    OutputOption,
    RepoOption,
    console,
    main_commit,
    open_repo,
    show,
)
from tinkops.cli_workflow import WorkflowIdArgument, missing_workflow, request_files, workflow_app
from tinkops.errors import TinkopsError
from tinkops.gitops import fetch_state, has_origin
from tinkops.history import workflow_timeline
from tinkops.reconciler import read_status
from tinkops.repository import WORKFLOWS_DIR
from tinkops.views import format_duration, timeline_rows
from tinkops_agent.eventlog import WorkflowHead, parse_time, read_events, read_head
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import Event, State, workflow_ref


class WatchTimeout(TinkopsError):
    """The workflow had not ended when ``workflow watch --timeout`` ran out."""


# --- watch ----------------------------------------------------------------------------------


@workflow_app.command("watch")
def workflow_watch(
    workflow_id: WorkflowIdArgument,
    interval: Annotated[
        float,
        typer.Option(metavar="SECONDS", min=0.1, help="seconds between two reads of the workflow"),
    ] = 1.0,
    timeout: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0, help="give up after this many seconds; 0 waits until the end"
        ),
    ] = 0.0,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Follow a workflow until it ends; exit 1 unless it ends SUCCESS."""
    repo = open_repo(repo_path)
    remote = fetch and has_origin(repo)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    head = _wait_for_render(repo, workflow_id, remote, interval, deadline)
    started = time.monotonic()

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        TextColumn("{task.fields[state]:<9} {task.fields[seconds]}"),
        console=console,
    ) as progress:
        bars = _add_bars(progress, head)
        seen = head.commit
        _print_events(progress, repo, None, seen)
        while True:
            _update_bars(progress, bars, head)
            if head.status.state.terminal:
                break
            _check_deadline(deadline, workflow_id, head)
            time.sleep(interval)
            if remote:
                fetch_state(repo, workflow_ids=[workflow_id])
            tip = repo.rev_parse(workflow_ref(workflow_id))
            if tip is not None and tip != seen:
                _print_events(progress, repo, seen, tip)
                head, seen = read_head(repo, tip), tip

    state = head.status.state
    console.print(
        f"Workflow {workflow_id} ended {state.value} "
        f"(watched for {format_duration(int(time.monotonic() - started))})",
        markup=False,
    )
    if state is not State.SUCCESS:
        raise typer.Exit(1)


def _wait_for_render(
    repo: GitRepo, workflow_id: str, remote: bool, interval: float, deadline: float | None
) -> WorkflowHead:
    """Return the workflow once it is rendered; fail at once if its request cannot render."""
    announced = False
    while True:
        if remote:
            fetch_state(repo, workflow_ids=[workflow_id])
        tip = repo.rev_parse(workflow_ref(workflow_id))
        if tip is not None:
            return read_head(repo, tip)
        requests = request_files(repo, main_commit(repo))
        failed = read_status(repo, "main").failed_requests.get(workflow_id)
        if workflow_id not in requests or failed:
            raise missing_workflow(repo, workflow_id)
        if not announced:
            console.print(
                f"Waiting for the provisioner to render {requests[workflow_id]}", markup=False
            )
            announced = True
        if deadline is not None and time.monotonic() > deadline:
            raise WatchTimeout(
                f"workflow {workflow_id} was not rendered in time; check that "
                "'tinkops serve' runs ('tinkops status' shows what it did last)"
            )
        time.sleep(interval)


def _check_deadline(deadline: float | None, workflow_id: str, head: WorkflowHead) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise WatchTimeout(
            f"workflow {workflow_id} is still {head.status.state.value} after --timeout; "
            f"watch it again, or check its agent with 'tinkops workflow events {workflow_id}'"
        )


def _add_bars(progress: Progress, head: WorkflowHead) -> list[TaskID]:
    return [
        progress.add_task(
            f"{action.task}/{action.name} on {action.worker}", total=1, state="", seconds=""
        )
        for action in head.status.actions
    ]


def _update_bars(progress: Progress, bars: list[TaskID], head: WorkflowHead) -> None:
    for bar, action in zip(bars, head.status.actions, strict=True):
        done = action.state not in (State.PENDING, State.RUNNING)
        if action.state is State.RUNNING and action.started_at:
            seconds = format_duration(int(time.time() - parse_time(action.started_at)))
        elif done and action.started_at:
            seconds = format_duration(action.seconds)
        else:
            seconds = ""
        progress.update(
            bar,
            completed=1 if done else 0,
            state=action.state.value,
            seconds=seconds,
            refresh=False,
        )
    progress.refresh()


def _print_events(progress: Progress, repo: GitRepo, old: str | None, new: str) -> None:
    """Print the events between two commits of a workflow ref (from the start when None)."""
    revisions = new if old is None else f"{old}..{new}"
    for _commit, event in read_events(repo, revisions):
        progress.console.print(_event_line(event), markup=False)


def _event_line(event: Event) -> str:
    state = (event.action_state or event.workflow_state).value
    where = f"{event.task}/{event.action}" if event.action else f"workflow {event.workflow}"
    line = f"{event.created_at or '':<20}  {state:<9} {where}"
    if event.worker:
        line += f" on {event.worker}"
    if event.message:
        line += f": {event.message}"
    return line


# --- timeline -------------------------------------------------------------------------------


@workflow_app.command("timeline")
def workflow_timeline_command(
    workflow_id: WorkflowIdArgument,
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show a workflow's history from git, commit by commit.

    Each row is a commit of the request on main or of the workflow's ref: its time, the
    time since the row before, its author and its subject.
    """
    repo = open_repo(repo_path)
    if fetch:
        fetch_state(repo, workflow_ids=[workflow_id])
    main = main_commit(repo)
    request = request_files(repo, main).get(workflow_id)
    source_commit = None
    tip = repo.rev_parse(workflow_ref(workflow_id))
    if tip is not None:
        workflow = read_head(repo, tip).workflow
        request = workflow.request or request
        source_commit = workflow.source_commit
    if tip is None and request is None:
        raise missing_workflow(repo, workflow_id)
    path = request or f"{WORKFLOWS_DIR}/{workflow_id}.yaml"
    entries = workflow_timeline(repo, workflow_id, path, main, source_commit)
    show(timeline_rows(entries), output, headers=not no_headers)
