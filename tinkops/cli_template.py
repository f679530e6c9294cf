"""The ``template`` command group: Tinkerbell's verbs on the files under ``templates/``.

``create``, ``update`` and ``delete`` commit the change the GitOps way. A template is
checked before it is committed, with the same validation as ``tinkops validate`` (the
template alone, and every request on main that would render it), and rejected with every
problem listed.
"""

from __future__ import annotations

import dataclasses
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
    main_snapshot,
    open_repo,
    print_commit,
    print_ids,
    read_document,
    show,
    warn,
)
from tinkops.errors import InvalidContent, NotFound, Problem, TinkopsError
from tinkops.gitops import commit_file, commit_files, fetch_state
from tinkops.history import file_dates
from tinkops.repository import (
    TEMPLATES_DIR,
    CommitSource,
    Entry,
    EntryKind,
    Snapshot,
    SnapshotReader,
    blob_id,
)
from tinkops.template import TEMPLATE_NAME, TemplateSource, read_template
from tinkops.validation import check_snapshot
from tinkops.views import TemplateInfo, template_rows
from tinkops.workflows import list_workflow_ids
from tinkops_agent.gitrepo import GitRepo

template_app = typer.Typer(
    help="Create, inspect, update and delete templates.", no_args_is_help=True
)

NameArgument = Annotated[str, typer.Argument(metavar="NAME", help="template name")]
FileOption = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        "--path",
        "-p",
        metavar="FILE",
        help="the template, in Tinkerbell's format (default: standard input)",
    ),
]


# --- Checking a template before it is committed ---------------------------------------------


class OverlaySource:
    """A commit's tree with some files replaced or added, read as a snapshot source."""

    def __init__(self, repo: GitRepo, commit: str, files: dict[str, bytes]) -> None:
        self.base = CommitSource(repo, commit)
        self.files = {blob_id(data): data for data in files.values()}
        self.entries_added = {
            path: Entry(EntryKind.FILE, len(data), blob_id(data)) for path, data in files.items()
        }

    @property
    def label(self) -> str:
        return self.base.label

    def entries(self) -> dict[str, Entry]:
        return {**self.base.entries(), **self.entries_added}

    def read(self, blobs: list[str]) -> dict[str, bytes]:
        found = {blob: self.files[blob] for blob in blobs if blob in self.files}
        found.update(self.base.read([blob for blob in blobs if blob not in self.files]))
        return found


def declared_name(data: bytes, label: str) -> str:
    """Return the ``name`` a template document declares; raise InvalidContent without one."""
    problems: list[Problem] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TinkopsError(f"{label} is not UTF-8 text; save it as UTF-8") from error
    source = read_template("candidate", label, text, problems)
    name = source.declared_name if source is not None else None
    if name is None or not TEMPLATE_NAME.match(name):
        if not problems:
            problems.append(
                Problem(label, None, "name", "the template has no valid name", "add name: NAME")
            )
        raise InvalidContent(problems)
    return name


def check_template_change(
    repo: GitRepo, snapshot: Snapshot, path: str, data: bytes, rendered: set[str]
) -> list[Problem]:
    """Return the problems that committing ``data`` at ``path`` would bring onto main.

    Requests that are already rendered are left out: their workflows never change.
    """
    changed = SnapshotReader(repo).read_source(OverlaySource(repo, snapshot.commit, {path: data}))
    report = check_snapshot(changed, {path})
    return [
        problem
        for problem in report.problems({path})
        if not (problem.file.startswith("workflows/") and _request_id(problem.file) in rendered)
    ]


def _request_id(path: str) -> str:
    return path.rpartition("/")[2].rpartition(".")[0]


def _reject(problems: list[Problem], subject: str, path: str, label: str) -> None:
    """Print every problem, naming the operator's file for the template's own, and fail."""
    for problem in problems:
        reported = dataclasses.replace(problem, file=label) if problem.file == path else problem
        typer.echo(str(reported), err=True)
    count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
    raise TinkopsError(f"{subject} rejected, nothing committed: {count}; fix them and run again")


def _prepare(repo: GitRepo, push: bool) -> tuple[Snapshot, set[str]]:
    if push:
        fetch_state(repo)
    return main_snapshot(repo), set(list_workflow_ids(repo))


# --- create, update, delete -----------------------------------------------------------------


@template_app.command("create")
def template_create(
    file: FileOption = None,
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Check a template and commit it as templates/<name>.yaml."""
    data, label = read_document(file)
    name = declared_name(data, label)
    repo = open_repo(repo_path)
    snapshot, rendered = _prepare(repo, push)
    existing = snapshot.template(name)
    if existing is not None:
        raise TinkopsError(
            f"template {name!r} already exists ({existing.file}); change it with "
            f"'tinkops template update {name} --file {label}'"
        )

    path = f"{TEMPLATES_DIR}/{name}.yaml"
    problems = check_template_change(repo, snapshot, path, data, rendered)
    if problems:
        _reject(problems, f"template {name}", path, label)
    result = commit_file(
        repo,
        path,
        data,
        f"Add template {name}\n\nFrom {Path(label).name}.\n",
        branch=branch,
        push=push,
    )
    console.print(f"Created Template:  {name}", markup=False)
    print_commit(repo, result, path)


@template_app.command("update")
def template_update(
    name: NameArgument,
    file: FileOption = None,
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Check a new version of a template and commit it.

    Workflows already rendered from the template keep their definition; requests rendered
    from now on use the new version.
    """
    data, label = read_document(file)
    declared = declared_name(data, label)
    repo = open_repo(repo_path)
    snapshot, rendered = _prepare(repo, push)
    template = _find(snapshot, name)
    if declared not in (name, template.declared_name, template.name):
        raise TinkopsError(
            f"{label} declares template {declared!r}, not {name!r}; to rename a template, "
            "create the new one and delete the old one"
        )
    if repo.read_file(snapshot.commit, template.file) == data:
        console.print(f"Template {name} is unchanged; nothing to commit", markup=False)
        return

    problems = check_template_change(repo, snapshot, template.file, data, rendered)
    if problems:
        _reject(problems, f"the update of template {name}", template.file, label)
    result = commit_file(
        repo,
        template.file,
        data,
        f"Update template {name}\n\nFrom {Path(label).name}.\n",
        branch=branch,
        push=push,
    )
    console.print(f"Updated Template:  {name}", markup=False)
    print_commit(repo, result, template.file)


@template_app.command("delete")
def template_delete(
    names: Annotated[list[str], typer.Argument(metavar="NAME", help="template names")],
    force: Annotated[
        bool,
        typer.Option("--force", help="delete even when requests that are not rendered yet use it"),
    ] = False,
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Remove templates from the main branch.

    Workflows rendered from them are kept.
    """
    repo = open_repo(repo_path)
    snapshot, rendered = _prepare(repo, push)
    templates = [_find(snapshot, name) for name in dict.fromkeys(names)]
    files = {template.file for template in templates}
    users = sorted(
        request.id
        for request in snapshot.requests.values()
        if request.id not in rendered
        and (found := snapshot.template(request.template)) is not None
        and found.file in files
    )
    if users and not force:
        raise TinkopsError(
            f"requests that are not rendered yet use these templates: {', '.join(users)}; "
            "delete those requests first, or pass --force to leave them failing to render"
        )
    if users:
        warn(f"these requests will fail to render: {', '.join(users)}")

    listed = ", ".join(template.name for template in templates)
    result = commit_files(
        repo,
        dict.fromkeys(sorted(files)),
        f"Delete template{'s' if len(templates) > 1 else ''} {listed}\n",
        branch=branch,
        push=push,
    )
    for template in templates:
        typer.echo(f"Deleted\t{template.name}")
    print_commit(repo, result, ", ".join(sorted(files)))


def _find(snapshot: Snapshot, name: str) -> TemplateSource:
    template = snapshot.template(name)
    if template is None:
        raise NotFound(f"template {name!r} not found; list them with 'tinkops template list'")
    return template


# --- get and list ---------------------------------------------------------------------------


def _infos(
    repo: GitRepo, snapshot: Snapshot, templates: list[TemplateSource]
) -> list[TemplateInfo]:
    dates = file_dates(repo, snapshot.commit, TEMPLATES_DIR)
    infos = []
    for template in templates:
        when = dates.get(template.file)
        infos.append(
            TemplateInfo(
                id=template.name,
                name=template.declared_name or template.name,
                file=template.file,
                created_at=when.created_at if when else "",
                updated_at=when.updated_at if when else "",
            )
        )
    return infos


@template_app.command("get")
def template_get(
    names: Annotated[
        list[str] | None,
        typer.Argument(metavar="NAME", help="template names (default: all)"),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="print the template file as stored (one NAME)")
    ] = False,
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show templates with Tinkerbell's columns.

    With -o json or yaml, each record adds the template's text; --raw prints one file.
    """
    repo = open_repo(repo_path)
    snapshot = main_snapshot(repo, fetch=fetch)
    if raw:
        if not names or len(names) != 1:
            raise TinkopsError("--raw prints one template; pass exactly one NAME")
        content = repo.read_file(snapshot.commit, _find(snapshot, names[0]).file) or b""
        typer.echo(content.decode(errors="replace"), nl=False)
        return
    if names:
        templates = [_find(snapshot, name) for name in dict.fromkeys(names)]
    else:
        templates = sorted(snapshot.templates.values(), key=lambda t: t.name)
    infos = _infos(repo, snapshot, templates)
    rows = template_rows(infos)
    records: list[dict[str, Any]] = [
        {**record, "file": template.file, "data": template.text}
        for record, template in zip(rows.records(), templates, strict=True)
    ]
    show(rows, output, headers=not no_headers, records=records)


@template_app.command("list")
def template_list(
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    quiet: QuietOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """List the templates on the main branch."""
    repo = open_repo(repo_path)
    snapshot = main_snapshot(repo, fetch=fetch)
    templates = sorted(snapshot.templates.values(), key=lambda t: t.name)
    if quiet:
        print_ids([template.name for template in templates])
        return
    infos = _infos(repo, snapshot, templates)
    records = [
        {**record, "file": info.file}
        for record, info in zip(template_rows(infos, listing=True).records(), infos, strict=True)
    ]
    show(template_rows(infos, listing=True), output, headers=not no_headers, records=records)
