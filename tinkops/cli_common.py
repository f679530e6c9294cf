"""Pieces every CLI command shares: the console, errors, the repository, output formats."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console

from tinkops.errors import TinkopsError
from tinkops.gitops import CommitResult, fetch_branch, has_origin
from tinkops.home import REPOSITORY_DIR
from tinkops.repository import Snapshot, SnapshotReader
from tinkops.views import Rows, table
from tinkops_agent.gitrepo import GitRepo

console = Console(highlight=False, soft_wrap=False, width=160)

# A document read from a file or standard input is read whole, so its size is capped like
# every repository file.
MAX_DOCUMENT_BYTES = 1024 * 1024


class _BlockDumper(yaml.SafeDumper):
    """Writes text of several lines (a template, a log tail) as a literal block."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _represent_text)


class Output(enum.Enum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


RepoOption = Annotated[
    Path,
    typer.Option(
        "--repo",
        envvar="TINKOPS_REPO",
        metavar="PATH",
        help="the infrastructure repository: a clone, or a provisioner home",
    ),
]
OutputOption = Annotated[Output, typer.Option("--output", "-o", "--format", help="output format")]
NoHeadersOption = Annotated[bool, typer.Option("--no-headers", help="omit the table header")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="print only the ids")]
FetchOption = Annotated[
    bool,
    typer.Option("--fetch/--no-fetch", help="in a clone, fetch from origin first"),
]
BranchOption = Annotated[
    str | None,
    typer.Option(
        "--branch",
        metavar="NAME",
        help="commit on this new branch, ready for a pull request, instead of the main branch",
    ),
]
PushOption = Annotated[
    bool,
    typer.Option("--push/--no-push", help="push the commit to origin (in a clone)"),
]


def fail(message: str) -> NoReturn:
    # Plain print: an error stays one line, whatever the terminal width.
    print(f"tinkops: {message}", file=sys.stderr)
    sys.exit(1)


def warn(message: str) -> None:
    print(f"tinkops: {message}", file=sys.stderr)


def open_repo(path: Path) -> GitRepo:
    """Return the repository at ``path``: a provisioner home, a bare repository or a clone."""
    if (path / REPOSITORY_DIR / "HEAD").exists():
        path = path / REPOSITORY_DIR
    repo = GitRepo(path)
    if not path.exists() or repo.execute("rev-parse", "--git-dir").returncode != 0:
        raise TinkopsError(
            f"{path} is not a git repository; pass --repo with a clone of the "
            "infrastructure repository or a provisioner home"
        )
    return repo


def main_commit(repo: GitRepo, branch: str = "main") -> str:
    """Return the tip of the main branch: origin's copy when the repository is a clone."""
    commit = repo.rev_parse(f"refs/remotes/origin/{branch}") or repo.rev_parse(
        f"refs/heads/{branch}"
    )
    if commit is None:
        raise TinkopsError(
            f"branch {branch!r} not found in {repo.path}; pass --repo with a clone of the "
            "infrastructure repository or a provisioner home"
        )
    return commit


def main_snapshot(repo: GitRepo, branch: str = "main", *, fetch: bool = False) -> Snapshot:
    """Read the main branch (fetched from origin first when ``fetch`` and there is one)."""
    if fetch:
        fetch_branch(repo, branch)
    return SnapshotReader(repo).read(main_commit(repo, branch))


def read_document(file: Path | None) -> tuple[bytes, str]:
    """Return the content of ``file`` (standard input when None) and a label naming it."""
    if file is None or str(file) == "-":
        if sys.stdin.isatty():
            raise TinkopsError("no --file given and standard input is a terminal; pass --file F")
        data = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
        label = "<stdin>"
    else:
        try:
            with file.open("rb") as handle:
                data = handle.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as error:
            raise TinkopsError(f"cannot read {file}: {error.strerror}; check the path") from error
        label = str(file)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise TinkopsError(f"{label} is over the limit of {MAX_DOCUMENT_BYTES} bytes")
    if not data.strip():
        raise TinkopsError(f"{label} is empty; pass a file with the document")
    return data, label


def show(
    rows: Rows,
    output: Output,
    *,
    headers: bool = True,
    records: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Print ``rows`` as a table, or as JSON or YAML records (``records`` when given)."""
    data = list(records) if records is not None else rows.records()
    if output is Output.JSON:
        typer.echo(json.dumps(data, indent=2))
    elif output is Output.YAML:
        text = yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True)
        typer.echo(text, nl=False)
    else:
        console.print(table(rows, headers=headers))


def print_ids(ids: Sequence[str]) -> None:
    for item in dict.fromkeys(ids):
        typer.echo(item)


def print_commit(repo: GitRepo, result: CommitResult, files: str) -> None:
    """Print where a change was committed, and what to do next with a branch or a local commit."""
    where = f"branch {result.branch}"
    if result.pushed:
        where += " (pushed to origin)"
    elif has_origin(repo):
        where += f" (not pushed; push it with 'git push origin {result.branch}')"
    console.print(f"  {files} committed {result.commit[:12]} on {where}", markup=False)
    if result.branch != "main":
        console.print(
            f"  open a pull request from {result.branch} into main; the provisioner acts on "
            "it once it is merged",
            markup=False,
        )
