"""``tinkops``: the operator's command line.

Exit codes: 0 success; 1 an error the message explains (invalid input, not found, a failed
operation, a workflow that ended FAILED, TIMEOUT or CANCELLED where a command waits for
it); 2 a usage mistake (unknown option, missing argument).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from tinkops import (
    cli_follow,
    cli_gitops,
    cli_hardware,
    cli_lifecycle,
    cli_ops,
    cli_remote,
    cli_template,
    cli_workflow,
)
from tinkops.cli_common import console, fail
from tinkops.errors import TinkopsError
from tinkops.home import DEFAULT_PORT, ProvisionerConfig, init_home

app = typer.Typer(
    name="tinkops",
    help="GitOps bare-metal workflows: Tinkerbell's templates, with git as the database.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    # Plain help: typer's rich help marks every flag, --help included, as "<bool>".
    rich_markup_mode=None,
)

HomeOption = Annotated[
    Path, typer.Option("--home", envvar="TINKOPS_HOME", help="provisioner home folder")
]


@app.command()
def init(
    home: Annotated[Path, typer.Argument(help="folder to create the provisioner in")],
    port: Annotated[int, typer.Option(help="SSH port the provisioner listens on")] = DEFAULT_PORT,
    branch: Annotated[str, typer.Option(help="name of the main branch")] = "main",
    requests: Annotated[
        bool,
        typer.Option("--requests/--no-requests", help="include the example workflow request"),
    ] = True,
    agent_keys: Annotated[
        bool,
        typer.Option(
            "--agent-keys/--no-agent-keys",
            help="generate an SSH key for each hardware record's agent",
        ),
    ] = True,
) -> None:
    """Create a provisioner home from the example layout.

    The home contains the repository, the host key, an operator key and agent keys.
    """
    report = init_home(
        home,
        include_requests=requests,
        generate_agent_keys=agent_keys,
        port=port,
        branch=branch,
    )
    console.print(f"Created provisioner in {report.home}")
    console.print(
        f"  repository:   {report.home / 'repository.git'} ({branch} at {report.commit[:12]})"
    )
    if report.operator_key:
        console.print(f"  operator key: {report.operator_key}")
    for name, path in report.agent_keys.items():
        console.print(f"  agent key for hardware {name}: {path}")
    console.print(f"Start it with: tinkops serve --home {report.home}")


@app.command()
def serve(
    home: HomeOption = Path("."),
    listen: Annotated[
        str | None, typer.Option(help="address to listen on (default from config.yaml)")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="SSH port (default from config.yaml; 0 picks a free port)"),
    ] = None,
    show_host_key: Annotated[
        bool, typer.Option("--show-host-key", help="print the host key and exit")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="serve Prometheus metrics on this port of the listen address (default: off)"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the reconciler and the SSH endpoint until interrupted."""
    from tinkops.provisioner import Provisioner

    # git hooks run inside the repository, so every path they get must be absolute.
    config = ProvisionerConfig.load(home.resolve())
    if listen is not None:
        config.listen = listen
    if port is not None:
        config.port = port
    provisioner = Provisioner(config, metrics_port=metrics_port)
    if show_host_key:
        console.print(provisioner.host_key_line)
        console.print(provisioner.host_key_fingerprint)
        return
    _configure_logging(verbose)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with provisioner:
        console.print(f"Serving {provisioner.url}")
        if provisioner.metrics_server is not None:
            console.print(
                f"Metrics: http://{config.listen}:{provisioner.metrics_server.port}/metrics"
            )
        console.print(f"Host key: {provisioner.host_key_line} ({provisioner.host_key_fingerprint})")
        stop.wait()
    console.print("Stopped")


@app.command()
def demo(
    home: Annotated[
        Path | None,
        typer.Option(help="keep the demo's provisioner here (default: a temporary folder)"),
    ] = None,
    runtime: Annotated[str, typer.Option(help="auto, docker or process")] = "auto",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the workflow")] = 120.0,
) -> None:
    """Run a real workflow end to end on this machine."""
    from tinkops.demo import run_demo

    state = run_demo(console, home=home, runtime=runtime, timeout=timeout)
    if state != "SUCCESS":
        raise typer.Exit(1)


# Help lists commands in this order: the provisioner, the GitOps checks, then Tinkerbell's
# groups. Importing cli_lifecycle and cli_follow adds their verbs to the workflow group.
_WORKFLOW_MODULES = (cli_lifecycle, cli_follow)
app.command("validate")(cli_gitops.validate)
app.command("diff")(cli_gitops.diff)
cli_ops.register(app)
cli_remote.register(app)
app.add_typer(cli_workflow.workflow_app, name="workflow")
app.add_typer(cli_template.template_app, name="template")
app.add_typer(cli_hardware.hardware_app, name="hardware")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    """Run the CLI, turning every tinkops error into one line on stderr and exit code 1."""
    try:
        app(prog_name="tinkops")
    except TinkopsError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
