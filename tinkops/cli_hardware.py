"""The ``hardware`` command group: Tinkerbell's verbs on the records under ``hardware/``.

Records are found by name, ``id``, MAC address (any letter case and notation) or IP address.
``push`` and ``delete`` commit the change the GitOps way; the other verbs only read.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
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
from tinkops.errors import NotFound
from tinkops.gitops import commit_files, fetch_branch
from tinkops.hardware import Hardware, Interface, is_resource
from tinkops.hardware_import import import_hardware
from tinkops.repository import Snapshot
from tinkops.views import Rows, hardware_rows, interface_fields
from tinkops_agent.protocol import normalize_mac

hardware_app = typer.Typer(
    help="Import, inspect and delete hardware records.", no_args_is_help=True
)

# Fields of Tinkerbell's hardware document that are numbers or booleans in its JSON. Records
# keep every scalar as the text written, so ``hardware id`` turns these back.
_NUMBER_FIELDS = frozenset({"lease_time", "family"})
_BOOLEANS = {"true": True, "false": False}

DetailsOption = Annotated[
    bool, typer.Option("--details", "-d", help="print the whole record as JSON")
]


# --- Finding records ------------------------------------------------------------------------


def find_record(snapshot: Snapshot, key: str) -> Hardware | None:
    """Return the record whose name, id, MAC or IP address is ``key``."""
    record = snapshot.hardware.get(key)
    if record is None:
        record = next((r for r in snapshot.hardware.values() if r.id == key), None)
    if record is None:
        record = _by_mac(snapshot, key)[0]
    if record is None:
        record = _by_ip(snapshot, key)[0]
    return record


def _by_mac(snapshot: Snapshot, key: str) -> tuple[Hardware | None, Interface | None]:
    try:
        mac = normalize_mac(key)
    except ValueError:
        return None, None
    record = snapshot.workers.get(mac)
    if record is None:
        return None, None
    return record, next(i for i in record.interfaces if i.mac == mac)


def _by_ip(snapshot: Snapshot, key: str) -> tuple[Hardware | None, Interface | None]:
    try:
        address = str(ipaddress.ip_address(key.strip()))
    except ValueError:
        return None, None
    for record in snapshot.hardware.values():
        for interface in record.interfaces:
            if interface.ip == address:
                return record, interface
    return None, None


def _not_found(key: str) -> NotFound:
    return NotFound(f"hardware {key!r} not found; list them with 'tinkops hardware list'")


def record_json(record: Hardware) -> dict[str, Any]:
    """Return the record as Tinkerbell's JSON document (or custom resource), metadata expanded."""
    if is_resource(record.raw):
        document: dict[str, Any] = dict(record.raw)
    else:
        document = {key: value for key, value in record.raw.items() if key != "metadata"}
        document = {"id": record.id, "metadata": dict(record.metadata), **document}
    typed: dict[str, Any] = _typed(document)
    return typed


def _typed(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {str(k): _typed(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(item, key) for item in value]
    if isinstance(value, str):
        if value in _BOOLEANS:
            return _BOOLEANS[value]
        if key in _NUMBER_FIELDS and value.isdigit():
            return int(value)
    return value


# --- Reading --------------------------------------------------------------------------------


@hardware_app.command("list")
def hardware_list(
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    quiet: QuietOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """List hardware records, one row per interface."""
    snapshot = main_snapshot(open_repo(repo_path), fetch=fetch)
    records = sorted(snapshot.hardware.values(), key=lambda r: r.name)
    if quiet:
        print_ids([record.id for record in records])
        return
    show(hardware_rows(records), output, headers=not no_headers)


@hardware_app.command("get")
def hardware_get(
    keys: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="KEY",
            help="record names, ids, MAC addresses (any notation) or IP addresses (default: all)",
        ),
    ] = None,
    output: OutputOption = Output.TABLE,
    no_headers: NoHeadersOption = False,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show hardware records, found by name, id, MAC or IP address."""
    snapshot = main_snapshot(open_repo(repo_path), fetch=fetch)
    if not keys:
        records = sorted(snapshot.hardware.values(), key=lambda r: r.name)
        show(hardware_rows(records), output, headers=not no_headers)
        return
    found = {key: find_record(snapshot, key) for key in dict.fromkeys(keys)}
    records = list({r.name: r for r in found.values() if r is not None}.values())
    missing = [key for key, record in found.items() if record is None]
    if records or not missing:
        show(hardware_rows(records), output, headers=not no_headers)
    _report_missing(missing, "hardware")


def _report_missing(missing: list[str], kind: str) -> None:
    for key in missing[:-1]:
        warn(f"{kind} {key!r} not found")
    if missing:
        raise NotFound(
            f"{kind} {missing[-1]!r} not found; list the records with 'tinkops hardware list'"
        )


@hardware_app.command("id")
def hardware_id(
    ids: Annotated[list[str], typer.Argument(metavar="ID", help="record ids (or names)")],
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Print records as JSON, one per line.

    Each line is Tinkerbell's hardware document, with the metadata as an object.
    """
    snapshot = main_snapshot(open_repo(repo_path), fetch=fetch)
    missing = []
    for key in ids:
        record = next((r for r in snapshot.hardware.values() if r.id == key), None)
        record = record or snapshot.hardware.get(key)
        if record is None:
            missing.append(key)
            continue
        typer.echo(json.dumps(record_json(record)))
    _report_missing(missing, "hardware")


@hardware_app.command("mac")
def hardware_mac(
    macs: Annotated[
        list[str],
        typer.Argument(metavar="MAC", help="MAC addresses, in any letter case and notation"),
    ],
    details: DetailsOption = False,
    output: OutputOption = Output.TABLE,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show the record and the interface that own each MAC address."""
    snapshot = main_snapshot(open_repo(repo_path), fetch=fetch)
    _show_interfaces(snapshot, macs, _by_mac, "MAC address", details, output)


@hardware_app.command("ip")
def hardware_ip(
    addresses: Annotated[list[str], typer.Argument(metavar="IP", help="IP addresses")],
    details: DetailsOption = False,
    output: OutputOption = Output.TABLE,
    fetch: FetchOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Show the record and the interface that own each IP address."""
    snapshot = main_snapshot(open_repo(repo_path), fetch=fetch)
    _show_interfaces(snapshot, addresses, _by_ip, "IP address", details, output)


def _show_interfaces(
    snapshot: Snapshot,
    keys: list[str],
    lookup: Any,
    kind: str,
    details: bool,
    output: Output,
) -> None:
    matches: list[tuple[Hardware, Interface]] = []
    missing: list[str] = []
    for key in keys:
        record, interface = lookup(snapshot, key)
        if record is None or interface is None:
            missing.append(key)
        else:
            matches.append((record, interface))
    if details:
        for record, _interface in matches:
            typer.echo(json.dumps(record_json(record)))
    elif output is Output.TABLE and matches:
        rows = [field for record, i in matches for field in interface_fields(record, i)]
        show(Rows(("Field Name", "Value"), rows), output)
    elif matches:
        records = [dict(interface_fields(record, i)) for record, i in matches]
        keyed = [{k.lower().replace(" ", "_"): v for k, v in r.items()} for r in records]
        show(Rows(("Field Name", "Value"), []), output, records=keyed)
    for key in missing[:-1]:
        warn(f"{kind} {key!r} not found")
    if missing:
        raise NotFound(f"{kind} {missing[-1]!r} not found; list them with 'tinkops hardware list'")


# --- Changing -------------------------------------------------------------------------------


@hardware_app.command("push")
def hardware_push(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            metavar="FILE",
            help="Tinkerbell hardware document, JSON or YAML (default: standard input)",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="record name (default: the hostname, else the id)"),
    ] = None,
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Import a hardware document as hardware/<name>.yaml and commit it.

    A record with the same id is replaced and keeps its agent keys.
    """
    data, label = read_document(file)
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
    console.print("Hardware data pushed successfully", markup=False)
    print_commit(repo, result, imported.path)


@hardware_app.command("delete")
def hardware_delete(
    keys: Annotated[
        list[str], typer.Argument(metavar="KEY", help="record names, ids, MAC or IP addresses")
    ],
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Remove hardware records from the main branch.

    Rendered workflows are kept.
    """
    repo = open_repo(repo_path)
    if push:
        fetch_branch(repo, "main")
    snapshot = main_snapshot(repo)
    records: dict[str, Hardware] = {}
    for key in dict.fromkeys(keys):
        record = find_record(snapshot, key)
        if record is None:
            raise _not_found(key)
        records[record.file] = record
    names = ", ".join(record.name for record in records.values())
    noun = "hardware records" if len(records) > 1 else "hardware"
    result = commit_files(
        repo,
        dict.fromkeys(records),
        f"Remove {noun} {names}\n",
        branch=branch,
        push=push,
    )
    for record in records.values():
        typer.echo(f"Deleted\t{record.id}")
    print_commit(repo, result, ", ".join(records))
