"""``tinkops sync``: reconcile a repository that lives on an external SSH git server."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from tinkops.cli_common import console
from tinkops.remote_mode import RemoteReconciler, RemoteSettings, prepare_remote


def sync(
    remote: Annotated[
        str,
        typer.Option(
            "--remote",
            help="SSH URL of the infrastructure repository, ssh://[USER@]HOST[:PORT]/PATH",
        ),
    ],
    key: Annotated[
        Path,
        typer.Option(
            "--key",
            help="private SSH key (no passphrase) the reconciler authenticates and signs with",
        ),
    ],
    home: Annotated[
        Path,
        typer.Option(
            "--home",
            envvar="TINKOPS_HOME",
            help="folder for the local mirror and the pinned host key (created if missing)",
        ),
    ] = Path("."),
    branch: Annotated[str, typer.Option(help="the main branch's name")] = "main",
    host_key: Annotated[
        str | None, typer.Option(help="the server's host public key ('ssh-ed25519 AAAA...')")
    ] = None,
    host_key_fingerprint: Annotated[
        str | None,
        typer.Option(help="the server's host key fingerprint (SHA256:...), checked on connect"),
    ] = None,
    trust_on_first_use: Annotated[
        bool,
        typer.Option(
            "--trust-on-first-use", help="pin the host key the server presents the first time"
        ),
    ] = False,
    poll_interval: Annotated[
        float, typer.Option(help="seconds between two checks of the server")
    ] = 10.0,
    full_sync_interval: Annotated[
        float,
        typer.Option(help="seconds between full fetches of refs/tinkops/ while main stays put"),
    ] = 600.0,
    timeout_grace: Annotated[
        float,
        typer.Option(
            help="seconds after a global_timeout before the reconciler records TIMEOUT itself"
        ),
    ] = 10.0,
    require_signed_events: Annotated[
        bool,
        typer.Option(
            "--require-signed-events/--no-require-signed-events",
            help="ignore events not signed by the key of the worker they name (default: on)",
        ),
    ] = True,
    once: Annotated[bool, typer.Option("--once", help="sync once, then exit")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Reconcile the repository on an external git server: poll, render, push, supervise."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = RemoteSettings(
        url=remote,
        key=key.expanduser().resolve(),
        home=home.expanduser().resolve(),
        branch=branch,
        poll_interval=poll_interval,
        full_sync_interval=full_sync_interval,
        timeout_grace=timeout_grace,
        require_signed_events=require_signed_events,
    )
    prepare_remote(
        settings,
        host_key=host_key,
        host_key_fingerprint=host_key_fingerprint,
        trust_on_first_use=trust_on_first_use,
    )
    reconciler = RemoteReconciler(settings)
    if once:
        report = reconciler.sync()
        console.print(
            f"Synced {remote}: fetched {report.fetched}, {len(report.created)} workflow(s) "
            f"created, {len(report.ended)} ended, {len(report.invalid)} invalid event(s), "
            f"{report.pushed} ref(s) pushed",
            markup=False,
        )
        return

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    console.print(f"Syncing {remote} every {poll_interval:g} s", markup=False)
    reconciler.run(stop)
    console.print("Stopped")


def register(app: typer.Typer) -> None:
    app.command("sync")(sync)
