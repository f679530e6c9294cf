"""Pieces every CLI command shares: the console, errors, the repository, output formats."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml
from rich.console import Console

from tinkops.errors import TinkopsError
from tinkops.home import REPOSITORY_DIR
from tinkops.repository import Snapshot, SnapshotReader
from tinkops.views import Rows, table
from tinkops_agent.gitrepo import GitRepo

console = Console(highlight=False, soft_wrap=False, width=160)


class Output(enum.Enum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


RepoOption = Annotated[
    Path,
    typer.Option(
        "--repo",
        envvar="TINKOPS_REPO",
        help="the infrastructure repository: a clone, or a provisioner home",
    ),
]
OutputOption = Annotated[Output, typer.Option("--output", "-o", help="output format")]
NoHeadersOption = Annotated[bool, typer.Option("--no-headers", help="omit the table header")]


def fail(message: str) -> NoReturn:
    # Plain print: an error stays one line, whatever the terminal width.
    print(f"tinkops: {message}", file=sys.stderr)
    sys.exit(1)


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


def main_snapshot(repo: GitRepo, branch: str = "main") -> Snapshot:
    """Read the main branch: origin's copy when the repository is a clone, else its own."""
    commit = repo.rev_parse(f"refs/remotes/origin/{branch}") or repo.rev_parse(
        f"refs/heads/{branch}"
    )
    if commit is None:
        raise TinkopsError(f"branch {branch!r} not found in {repo.path}")
    return SnapshotReader(repo).read(commit)


def show(rows: Rows, output: Output, *, headers: bool = True) -> None:
    if output is Output.JSON:
        console.print_json(json.dumps(rows.records()))
    elif output is Output.YAML:
        console.print(yaml.safe_dump(rows.records(), sort_keys=False).rstrip(), markup=False)
    else:
        console.print(table(rows, headers=headers))
