"""The ``hardware`` command group: Tinkerbell's verbs on the records under ``hardware/``."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Annotated

import typer

from tinkops.cli_common import (
    NoHeadersOption,
    Output,
    OutputOption,
    RepoOption,
    console,
    main_snapshot,
    open_repo,
    show,
)
from tinkops.errors import NotFound, TinkopsError
from tinkops.gitops import commit_file, commit_files, fetch_branch
from tinkops.hardware import Hardware
from tinkops.hardware_import import import_hardware
from tinkops.repository import Snapshot
from tinkops.views import hardware_rows
from tinkops_agent.protocol import normalize_mac

hardware_app = typer.Typer(help="Import and inspect hardware records.", no_args_is_help=True)

# A pushed document is read whole, so its size is capped like every repository file.
MAX_DOCUMENT_BYTES = 1024 * 1024

BranchOption = Annotated[
    str | None,
    typer.Option(
        help="commit on this new branch, ready for a pull request, instead of the main branch"
    ),
]
PushOption = Annotated[bool, typer.Option("--push/--no-push", help="push to origin")]


@hardware_app.command("list")
def hardware_list(
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    repo_path: RepoOption = Path("."),
) -> None:
    """List the hardware records on the main branch, one row per interface."""
    snapshot = main_snapshot(open_repo(repo_path))
    records = sorted(snapshot.hardware.values(), key=lambda r: r.name)
    show(hardware_rows(records), output, headers=not no_headers)


@hardware_app.command("get")
def hardware_get(
    key: Annotated[
        str, typer.Argument(help="record name, id, MAC address (any notation) or IP address")
    ],
    output: OutputOption = Output.TABLE,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show one hardware record, found by name, id, MAC or IP address."""
    snapshot = main_snapshot(open_repo(repo_path))
    record = find_record(snapshot, key)
    if record is None:
        raise NotFound(f"hardware {key!r} not found; list them with 'tinkops hardware list'")
    show(hardware_rows([record]), output)


def find_record(snapshot: Snapshot, key: str) -> Hardware | None:
    """Return the record whose name, id, MAC or IP address is ``key``."""
    record = snapshot.hardware.get(key)
    if record is None:
        record = next((r for r in snapshot.hardware.values() if r.id == key), None)
    if record is None:
        try:
            record = snapshot.workers.get(normalize_mac(key))
        except ValueError:
            record = None
    if record is None:
        try:
            address = str(ipaddress.ip_address(key))
        except ValueError:
            return None
        record = next(
            (r for r in snapshot.hardware.values() for i in r.interfaces if i.ip == address),
            None,
        )
    return record


@hardware_app.command("push")
def hardware_push(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="Tinkerbell hardware document, JSON or YAML (default: stdin)"
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="record name (default: the hostname, else the id)"),
    ] = None,
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Import a hardware document as hardware/<name>.yaml and commit it.

    A record with the same id is replaced and keeps its agent keys.
    """
    data, label = _read_document(file)
    repo = open_repo(repo_path)
    if push:
        fetch_branch(repo, "main")
    imported = import_hardware(data, label, main_snapshot(repo), name)

    changes: dict[str, bytes | None] = {imported.path: imported.content}
    if imported.replaces and imported.replaces != imported.path:
        # The record with this id was stored under another file name; the import replaces it.
        changes[imported.replaces] = None
    verb = "Update" if imported.replaces else "Add"
    message = f"{verb} hardware {imported.name}\n\nImported from {Path(label).name}.\n"
    result = commit_files(repo, changes, message, branch=branch, push=push)
    where = f"branch {result.branch}" + (" (pushed)" if result.pushed else "")
    console.print("Hardware data pushed successfully", markup=False)
    console.print(f"  {imported.path} committed {result.commit[:12]} on {where}", markup=False)


def _read_document(file: Path | None) -> tuple[bytes, str]:
    if file is None:
        data = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
        label = "<stdin>"
    else:
        try:
            with file.open("rb") as handle:
                data = handle.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as error:
            raise TinkopsError(f"cannot read {file}: {error.strerror}") from error
        label = str(file)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise TinkopsError(f"{label} is over the limit of {MAX_DOCUMENT_BYTES} bytes")
    return data, label


@hardware_app.command("delete")
def hardware_delete(
    key: Annotated[str, typer.Argument(help="record name, id, MAC or IP address")],
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Remove a hardware record from the main branch (rendered workflows are kept)."""
    repo = open_repo(repo_path)
    if push:
        fetch_branch(repo, "main")
    record = find_record(main_snapshot(repo), key)
    if record is None:
        raise NotFound(f"hardware {key!r} not found; list them with 'tinkops hardware list'")
    result = commit_file(
        repo, record.file, None, f"Remove hardware {record.name}\n", branch=branch, push=push
    )
    typer.echo(f"Deleted\t{record.id}")
    typer.echo(f"  {record.file} removed in {result.commit[:12]} on {result.branch}")
