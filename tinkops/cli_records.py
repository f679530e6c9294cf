"""The ``workflow`` and ``template`` command groups, with Tinkerbell's verbs."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from tinkops.cli_common import (
    NoHeadersOption,
    Output,
    OutputOption,
    RepoOption,
    console,
    open_repo,
    show,
)
from tinkops.ephemeral import data_versions, read_version, sha256_hex
from tinkops.errors import InvalidContent, NotFound, TinkopsError
from tinkops.gitops import commit_file, fetch_workflow_refs
from tinkops.reconciler import read_status
from tinkops.repository import WORKFLOWS_DIR, Snapshot, SnapshotReader
from tinkops.request import valid_workflow_id
from tinkops.views import Rows, events_rows, state_rows, workflow_rows
from tinkops.workflows import list_workflow_ids, load_workflow
from tinkops.yamltext import dump
from tinkops_agent.eventlog import read_events, read_heads
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import DATA_FILE, workflow_ref

workflow_app = typer.Typer(help="Create and inspect workflows.", no_args_is_help=True)
template_app = typer.Typer(help="Inspect templates.", no_args_is_help=True)

FetchOption = Annotated[
    bool, typer.Option("--fetch/--no-fetch", help="fetch workflow state from origin first")
]


def _main_snapshot(repo: GitRepo, branch: str = "main") -> Snapshot:
    commit = repo.rev_parse(f"refs/remotes/origin/{branch}") or repo.rev_parse(
        f"refs/heads/{branch}"
    )
    if commit is None:
        raise TinkopsError(f"branch {branch!r} not found in {repo.path}")
    return SnapshotReader(repo).read(commit)


# --- workflow -------------------------------------------------------------------------------


@workflow_app.command("create")
def workflow_create(
    template: Annotated[str, typer.Option("--template", "-t", help="template name")],
    hardware: Annotated[
        str,
        typer.Option(
            "--hardware",
            "-r",
            help='device map as JSON, e.g. \'{"device_1": "08:00:27:00:00:01"}\'',
        ),
    ],
    workflow_id: Annotated[
        str | None,
        typer.Option("--id", help="workflow id (default: generated from the template name)"),
    ] = None,
    branch: Annotated[
        str | None,
        typer.Option(
            help="commit on this new branch, ready for a pull request, instead of the main branch"
        ),
    ] = None,
    push: Annotated[bool, typer.Option("--push/--no-push", help="push to origin")] = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Commit a workflow request; the reconciler renders it once it reaches the main branch."""
    repo = open_repo(repo_path)
    try:
        hardware_map = json.loads(hardware)
    except json.JSONDecodeError as error:
        raise TinkopsError(
            f"--hardware is not JSON ({error.msg} at column {error.colno}); "
            'write it like \'{"device_1": "08:00:27:00:00:01"}\''
        ) from error
    if not isinstance(hardware_map, dict) or not all(
        isinstance(v, str) for v in hardware_map.values()
    ):
        raise TinkopsError("--hardware must be a JSON object of device names to MAC addresses")
    workflow_id = workflow_id or _generate_id(template)
    if not valid_workflow_id(workflow_id):
        raise TinkopsError(
            f"workflow id {workflow_id!r} is invalid; use lower-case letters, "
            "digits, '.', '_' and '-' (at most 63 characters)"
        )

    snapshot = _main_snapshot(repo)
    if snapshot.template(template) is None:
        known = ", ".join(sorted(snapshot.templates)) or "none"
        raise NotFound(f"template {template!r} not found (known: {known})")
    path = f"{WORKFLOWS_DIR}/{workflow_id}.yaml"
    if path in snapshot.blobs:
        raise TinkopsError(f"{path} already exists; choose another --id")

    content = dump({"template": template, "hardware_map": hardware_map}).encode()
    result = commit_file(
        repo,
        path,
        content,
        f"Request workflow {workflow_id} from template {template}\n",
        branch=branch,
        push=push,
    )
    where = f"branch {result.branch}" + (" (pushed)" if result.pushed else "")
    console.print(f"Created Workflow:  {workflow_id}", markup=False)
    console.print(f"  committed {result.commit[:12]} on {where}", markup=False)


def _generate_id(template: str) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in template.lower()).strip("-")[:32]
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return f"{stem or 'workflow'}-{stamp}-{secrets.token_hex(2)}"


@workflow_app.command("get")
def workflow_get(
    workflow_ids: Annotated[list[str] | None, typer.Argument(help="workflow ids")] = None,
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show workflows (all when no id is given), with requests that failed to render."""
    repo = open_repo(repo_path)
    if fetch:
        fetch_workflow_refs(repo, workflow_ids or None)
    ids = list_workflow_ids(repo)
    wanted = workflow_ids or sorted(ids)
    missing = [i for i in wanted if i not in ids]
    found = read_heads(repo, [ids[i] for i in wanted if i in ids])
    heads = [found[ids[i]] for i in wanted if i in ids]
    failed = read_status(repo, "main").failed_requests if not workflow_ids else {}
    failed.update({i: ["not found"] for i in missing})
    show(workflow_rows(heads, failed), output, headers=not no_headers)
    if missing:
        raise typer.Exit(1)


@workflow_app.command("list")
def workflow_list(
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """List every workflow, with requests that failed to render."""
    workflow_get(None, output, no_headers, fetch, repo_path)


@workflow_app.command("state")
def workflow_state(
    workflow_id: Annotated[str, typer.Argument(help="workflow id")],
    output: OutputOption = Output.TABLE,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show a workflow's progress and current action."""
    repo = open_repo(repo_path)
    if fetch:
        fetch_workflow_refs(repo, [workflow_id])
    show(state_rows(load_workflow(repo, workflow_id)), output)


@workflow_app.command("events")
def workflow_events(
    workflow_id: Annotated[str, typer.Argument(help="workflow id")],
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """List a workflow's events, oldest first (one per commit of its ref)."""
    repo = open_repo(repo_path)
    if fetch:
        fetch_workflow_refs(repo, [workflow_id])
    load_workflow(repo, workflow_id)
    events = [event for _commit, event in read_events(repo, workflow_ref(workflow_id))]
    show(events_rows(events), output, headers=not no_headers)


@workflow_app.command("data")
def workflow_data(
    workflow_id: Annotated[str, typer.Argument(help="workflow id")],
    version: Annotated[
        int | None, typer.Option("--version", "-v", help="data version (default: the latest)")
    ] = None,
    file: Annotated[str, typer.Option(help="file under /workflow to show")] = DATA_FILE,
    metadata: Annotated[
        bool,
        typer.Option("--metadata", "-m", help="show who wrote the version, when, and its sha256"),
    ] = False,
    latest_version: Annotated[
        bool, typer.Option("--latest-version", "-l", help="print the latest version number")
    ] = False,
    output: OutputOption = Output.TABLE,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Print a workflow's ephemeral data (the /workflow/data document by default)."""
    repo = open_repo(repo_path)
    if fetch:
        fetch_workflow_refs(repo, [workflow_id])
    load_workflow(repo, workflow_id)
    if latest_version:
        versions = data_versions(repo, workflow_id)
        console.print(f"Latest workflow data version: {len(versions)}", markup=False)
        return
    chosen, content = read_version(repo, workflow_id, version, file)
    if metadata:
        rows = [
            ("Version", str(chosen.number)),
            ("Worker", chosen.worker),
            ("Task", chosen.task),
            ("Action", chosen.action),
            ("Written At", chosen.written_at),
            ("File", file),
            ("Size", str(len(content))),
            ("SHA256", sha256_hex(content)),
            ("Commit", chosen.commit),
        ]
        show(Rows(("Field Name", "Values"), rows), output)
        return
    typer.echo(content.decode(errors="replace"), nl=False)


# --- template -------------------------------------------------------------------------------


@template_app.command("list")
def template_list(
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    repo_path: RepoOption = Path("."),
) -> None:
    """List the templates on the main branch."""
    snapshot = _main_snapshot(open_repo(repo_path))
    rows = [(t.name, t.file) for t in sorted(snapshot.templates.values(), key=lambda t: t.name)]
    show(Rows(("Name", "File"), rows), output, headers=not no_headers)


@template_app.command("get")
def template_get(
    name: Annotated[str, typer.Argument(help="template name")],
    repo_path: RepoOption = Path("."),
) -> None:
    """Print a template as stored on the main branch."""
    snapshot = _main_snapshot(open_repo(repo_path))
    template = snapshot.template(name)
    if template is None:
        raise NotFound(f"template {name!r} not found; list them with 'tinkops template list'")
    typer.echo(template.text, nl=False)


def problems_text(error: InvalidContent) -> str:
    return "\n".join(str(problem) for problem in error.problems)
