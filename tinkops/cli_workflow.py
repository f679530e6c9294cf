"""The ``workflow`` command group: Tinkerbell's verbs on requests and rendered workflows.

``create`` commits a request on the main branch, or on a new branch for a pull request.
The reading verbs show the rendered workflows, fetched from ``origin`` first in a clone.
The verbs that change existing workflows (``delete``, ``rerun``) are in ``cli_lifecycle``,
and the ones that follow a workflow over time (``watch``, ``timeline``) in ``cli_follow``.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from tinkops.cli_common import (
    BranchOption,
    FetchOption,
    NoHeadersOption,
    Output,
    OutputOption,
    PushOption,
    QuietOption,
    RepoOption,
    console,
    main_commit,
    main_snapshot,
    open_repo,
    print_commit,
    print_ids,
    show,
    warn,
)
from tinkops.ephemeral import data_versions, read_version, sha256_hex
from tinkops.errors import NotFound, TinkopsError
from tinkops.gitops import commit_file, fetch_state
from tinkops.reconciler import read_status
from tinkops.repository import EXTENSIONS, WORKFLOWS_DIR
from tinkops.request import valid_workflow_id
from tinkops.views import Rows, events_rows, state_rows, workflow_get_rows, workflow_list_rows
from tinkops.workflows import list_workflow_ids, load_workflow
from tinkops.yamltext import dump
from tinkops_agent.eventlog import WorkflowHead, read_events, read_heads
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import DATA_FILE, workflow_ref

workflow_app = typer.Typer(
    help="Create, inspect, follow, rerun and delete workflows.", no_args_is_help=True
)

WorkflowIdArgument = Annotated[str, typer.Argument(metavar="ID", help="workflow id")]
AllOption = Annotated[
    bool,
    typer.Option(
        "--all", "-a", help="include workflows whose request was deleted from the main branch"
    ),
]


# --- Reading helpers shared by the workflow verbs -------------------------------------------


def request_files(repo: GitRepo, commit: str) -> dict[str, str]:
    """Return the request file of each workflow id on the main branch at ``commit``."""
    output = repo.run("ls-tree", "-z", "--name-only", commit, f"{WORKFLOWS_DIR}/")
    files: dict[str, str] = {}
    for raw in output.split(b"\0"):
        path = raw.decode(errors="replace")
        stem, dot, extension = path.rpartition("/")[2].rpartition(".")
        if dot and f".{extension}" in EXTENSIONS:
            files.setdefault(stem, path)
    return files


def missing_workflow(repo: GitRepo, workflow_id: str) -> NotFound:
    """Return the error for a workflow that has no ref, saying why when the request exists."""
    try:
        requests = request_files(repo, main_commit(repo))
    except TinkopsError:
        requests = {}
    if workflow_id in requests:
        problems = read_status(repo, "main").failed_requests.get(workflow_id)
        if problems:
            more = len(problems) - 1
            others = f" (and {more} more; 'tinkops status' lists them)" if more else ""
            return NotFound(f"workflow {workflow_id!r} was not rendered: {problems[0]}{others}")
        return NotFound(
            f"workflow {workflow_id!r} is not rendered yet; check that 'tinkops serve' runs "
            "('tinkops reconcile' waits for it)"
        )
    return NotFound(f"workflow {workflow_id!r} not found; list them with 'tinkops workflow list'")


def load_head(repo: GitRepo, workflow_id: str) -> WorkflowHead:
    """Return the workflow's latest state, or raise NotFound saying why it has none."""
    try:
        return load_workflow(repo, workflow_id)
    except NotFound:
        raise missing_workflow(repo, workflow_id) from None


def read_workflow(repo_path: Path, workflow_id: str, fetch: bool) -> tuple[GitRepo, WorkflowHead]:
    repo = open_repo(repo_path)
    if fetch:
        fetch_state(repo, workflow_ids=[workflow_id])
    return repo, load_head(repo, workflow_id)


# --- create ---------------------------------------------------------------------------------


@workflow_app.command("create")
def workflow_create(
    template: Annotated[
        str, typer.Option("--template", "-t", metavar="NAME", help="template name")
    ],
    hardware: Annotated[
        str,
        typer.Option(
            "--hardware",
            "-r",
            metavar="JSON",
            help='device map as JSON, e.g. \'{"device_1": "08:00:27:00:00:01"}\'',
        ),
    ],
    values: Annotated[
        str | None,
        typer.Option(
            "--values",
            metavar="JSON",
            help="values the template reads as values.<key>, as a JSON object",
        ),
    ] = None,
    workflow_id: Annotated[
        str | None,
        typer.Option(
            "--id", metavar="ID", help="workflow id (default: generated from the template name)"
        ),
    ] = None,
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Commit a workflow request for the provisioner to render.

    The provisioner renders the request once it is on the main branch.
    """
    repo = open_repo(repo_path)
    hardware_map = _json_object("--hardware", hardware, '{"device_1": "08:00:27:00:00:01"}')
    if not all(isinstance(value, str) for value in hardware_map.values()):
        raise TinkopsError(
            "--hardware must map device names to MAC addresses given as JSON strings"
        )
    workflow_id = workflow_id or _generate_id(template)
    if not valid_workflow_id(workflow_id):
        raise TinkopsError(
            f"workflow id {workflow_id!r} is invalid; use lower-case letters, "
            "digits, '.', '_' and '-' (at most 63 characters)"
        )

    if push:
        fetch_state(repo, workflow_ids=[workflow_id])
    snapshot = main_snapshot(repo)
    if snapshot.template(template) is None:
        known = ", ".join(sorted(snapshot.templates)) or "none"
        raise NotFound(f"template {template!r} not found (known: {known})")
    path = f"{WORKFLOWS_DIR}/{workflow_id}.yaml"
    existing = request_files(repo, snapshot.commit).get(workflow_id)
    if existing is not None:
        raise TinkopsError(f"{existing} already exists; choose another --id")
    if workflow_id in list_workflow_ids(repo):
        raise TinkopsError(
            f"workflow {workflow_id} was rendered before (its request has been deleted) "
            "and a rendered workflow never changes; choose another --id"
        )

    request: dict[str, Any] = {"template": template, "hardware_map": hardware_map}
    if values is not None:
        request["values"] = _json_object("--values", values, '{"image_url": "http://..."}')
    result = commit_file(
        repo,
        path,
        dump(request).encode(),
        f"Request workflow {workflow_id} from template {template}\n",
        branch=branch,
        push=push,
    )
    console.print(f"Created Workflow:  {workflow_id}", markup=False)
    print_commit(repo, result, path)


def _json_object(option: str, text: str, example: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise TinkopsError(
            f"{option} is not JSON ({error.msg} at column {error.colno}); write it like '{example}'"
        ) from error
    if not isinstance(value, dict):
        raise TinkopsError(f"{option} must be a JSON object, like '{example}'")
    return value


def _generate_id(template: str) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in template.lower()).strip("-")[:32]
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return f"{stem or 'workflow'}-{stamp}-{secrets.token_hex(2)}"


# --- get and list ---------------------------------------------------------------------------


@workflow_app.command("get")
def workflow_get(
    workflow_ids: Annotated[
        list[str] | None, typer.Argument(metavar="ID", help="workflow ids (default: all)")
    ] = None,
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    show_all: AllOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show workflows with Tinkerbell's columns.

    With -o json or yaml, each record adds the rendered definition and the state.
    """
    repo = open_repo(repo_path)
    if fetch:
        fetch_state(repo, workflow_ids=workflow_ids or None)
    rendered = list_workflow_ids(repo)
    if workflow_ids:
        selected = list(dict.fromkeys(workflow_ids))
    else:
        selected = _current(repo, rendered, show_all)
    missing = [workflow_id for workflow_id in selected if workflow_id not in rendered]
    heads = _heads(repo, rendered, [i for i in selected if i in rendered])
    records = [
        {**record, "workflow": head.workflow.to_dict(), "status": json.loads(head.status.to_json())}
        for record, head in zip(workflow_get_rows(heads).records(), heads, strict=True)
    ]
    if heads or not missing:
        show(workflow_get_rows(heads), output, headers=not no_headers, records=records)
    for workflow_id in missing:
        warn(str(missing_workflow(repo, workflow_id)))
    if missing:
        raise typer.Exit(1)


@workflow_app.command("list")
def workflow_list(
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    quiet: QuietOption = False,
    show_all: AllOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """List workflows, and the requests that failed to render."""
    repo = open_repo(repo_path)
    if fetch:
        fetch_state(repo)
    rendered = list_workflow_ids(repo)
    heads = _heads(repo, rendered, _current(repo, rendered, show_all))
    failed = read_status(repo, "main").failed_requests
    pending = {i: p for i, p in failed.items() if i not in rendered}
    rows = workflow_list_rows(heads, pending)
    if quiet:
        print_ids([row[0] for row in rows.rows])
        return
    show(rows, output, headers=not no_headers)


def _current(repo: GitRepo, rendered: dict[str, str], show_all: bool) -> list[str]:
    """Return the rendered workflow ids to list: those whose request is on main, or all."""
    if show_all:
        return sorted(rendered)
    requests = request_files(repo, main_commit(repo))
    return sorted(workflow_id for workflow_id in rendered if workflow_id in requests)


def _heads(repo: GitRepo, rendered: dict[str, str], ids: list[str]) -> list[WorkflowHead]:
    found = read_heads(repo, [rendered[i] for i in ids])
    return [found[rendered[i]] for i in ids]


# --- state, events, data --------------------------------------------------------------------


@workflow_app.command("state")
def workflow_state(
    workflow_id: WorkflowIdArgument,
    output: OutputOption = Output.TABLE,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show a workflow's progress and current action."""
    _repo, head = read_workflow(repo_path, workflow_id, fetch)
    show(state_rows(head), output)


@workflow_app.command("events")
def workflow_events(
    workflow_id: WorkflowIdArgument,
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """List a workflow's events, oldest first.

    Each event is one commit of the workflow's ref.
    """
    repo, _head = read_workflow(repo_path, workflow_id, fetch)
    events = [event for _commit, event in read_events(repo, workflow_ref(workflow_id))]
    show(events_rows(events), output, headers=not no_headers)


@workflow_app.command("data")
def workflow_data(
    workflow_id: WorkflowIdArgument,
    version: Annotated[
        int | None,
        typer.Option("--version", "-v", metavar="N", help="data version (default: the latest)"),
    ] = None,
    file: Annotated[str, typer.Option(metavar="PATH", help="file under /workflow to show")] = (
        DATA_FILE
    ),
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
    """Print a workflow's ephemeral data.

    By default the latest version of /workflow/data, the document actions share.
    """
    repo, _head = read_workflow(repo_path, workflow_id, fetch)
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
