"""``tinkops-agent``: the worker agent's command line.

Every option can also come from a YAML file (``--config``, keys named like the long options
with underscores); the command line wins. Exit codes: 0 stopped cleanly, 1 runtime failure,
2 invalid configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from tinkops_agent.agent import Agent, AgentConfig
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.remote import (
    Endpoint,
    HostKeyError,
    KeyRejected,
    Remote,
    pin_host_key,
    ssh_command,
)
from tinkops_agent.runtime import Runtime

log = logging.getLogger("tinkops_agent")

DEFAULTS: dict[str, Any] = {
    "state_dir": "/var/lib/tinkops-agent",
    "runtime": "docker",
    "pull": "missing",
    "network": "host",
    "poll_interval": 2.0,
    "default_timeout": 3600.0,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinkops-agent",
        description="Run tinkops workflow actions on this machine. "
        "'tinkops-agent logs WORKFLOW [INDEX]' prints the full output of actions run here.",
    )
    parser.add_argument("--config", type=Path, help="YAML file with any of these options")
    parser.add_argument("--worker-id", help="this machine's MAC address (or its agent id)")
    parser.add_argument(
        "--provisioner", help="repository URL, e.g. ssh://10.0.0.1:2222/tinkops.git"
    )
    parser.add_argument("--key", help="private SSH key this agent authenticates with")
    parser.add_argument(
        "--host-key", help="the provisioner's host public key ('ssh-ed25519 AAAA...')"
    )
    parser.add_argument(
        "--host-key-fingerprint",
        help="the provisioner's host key fingerprint "
        "(SHA256:...), checked against the key it presents",
    )
    parser.add_argument(
        "--trust-on-first-use",
        action="store_true",
        default=None,
        help="trust the host key presented at the first connection",
    )
    parser.add_argument(
        "--state-dir",
        help="folder for the local repository, /workflow data "
        f"and action logs (default {DEFAULTS['state_dir']})",
    )
    parser.add_argument(
        "--runtime",
        choices=("docker", "process"),
        help="run actions in Docker (default) or as host processes (development)",
    )
    parser.add_argument(
        "--pull",
        choices=("missing", "never", "always"),
        help="image pull policy (default missing: pull only absent images)",
    )
    parser.add_argument(
        "--network",
        choices=("host", "none"),
        help="network mode of action containers (default host)",
    )
    parser.add_argument("--docker-host", help="Docker engine URL (default: the environment's)")
    parser.add_argument(
        "--registry-credentials",
        help="YAML file mapping registry hosts to {username, password}; each is sent only "
        "to its own registry",
    )
    parser.add_argument("--poll-interval", type=float, help="seconds between queue checks")
    parser.add_argument(
        "--default-timeout",
        type=float,
        help="seconds allowed to actions whose "
        "timeout is 0 or missing; 0 means no limit (default 3600)",
    )
    parser.add_argument(
        "--sign-events",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sign each event commit with --key (git's SSH signature format); default: sign "
        "when the provisioner's status requires signed events",
    )
    parser.add_argument("--once", action="store_true", help="run what is runnable now, then exit")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    return parser


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(DEFAULTS)
    if args.config is not None:
        try:
            loaded = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SystemExit(f"tinkops-agent: cannot read config {args.config}: {error}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"tinkops-agent: config {args.config} must be a mapping")
        known = {action.dest for action in build_parser()._actions}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise SystemExit(
                f"tinkops-agent: config {args.config}: unknown keys {', '.join(unknown)}"
            )
        options.update(loaded)
    options.update({k: v for k, v in vars(args).items() if v is not None})
    for required in ("worker_id", "provisioner", "key"):
        if not options.get(required):
            flag = "--" + required.replace("_", "-")
            raise SystemExit(f"tinkops-agent: {flag} is required (or set {required} in --config)")
    return options


def make_runtime(options: dict[str, Any]) -> Runtime:
    if options["runtime"] == "process":
        from tinkops_agent.process_runtime import ProcessRuntime

        return ProcessRuntime()
    from tinkops_agent.docker_runtime import DockerRuntime, PullPolicy

    return DockerRuntime(
        base_url=options.get("docker_host"),
        pull=PullPolicy(options["pull"]),
        network_mode=options["network"],
        registry_auth=load_registry_auth(options.get("registry_credentials")),
    )


def load_registry_auth(path: str | None) -> dict[str, tuple[str, str]]:
    """Read ``registry host: {username, password}`` pairs; each is sent to its registry only.

    Raises SystemExit with the file and the fix when the file is unreadable or malformed.
    """
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(
            f"tinkops-agent: cannot read --registry-credentials {path}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise SystemExit(f"tinkops-agent: {path} must map registry hosts to credentials")
    credentials: dict[str, tuple[str, str]] = {}
    for registry, entry in data.items():
        if not isinstance(entry, dict) or not {"username", "password"} <= set(entry):
            raise SystemExit(
                f"tinkops-agent: {path}: {registry!r} needs username and password, e.g. "
                "'quay.io: {username: robot, password: secret}'"
            )
        credentials[str(registry)] = (str(entry["username"]), str(entry["password"]))
    return credentials


def show_logs(argv: list[str]) -> int:
    """``tinkops-agent logs WORKFLOW [INDEX]``: print the full output of a workflow's actions,
    kept on this machine (events carry only the last lines)."""
    parser = argparse.ArgumentParser(
        prog="tinkops-agent logs", description="Print the full output of actions run here."
    )
    parser.add_argument("workflow", help="workflow id")
    parser.add_argument("index", nargs="?", type=int, help="action index (default: all)")
    parser.add_argument(
        "--state-dir",
        default=DEFAULTS["state_dir"],
        help=f"the agent's state folder (default {DEFAULTS['state_dir']})",
    )
    args = parser.parse_args(argv)
    folder = Path(args.state_dir) / "logs" / args.workflow
    logs = sorted(folder.glob("*.log")) if folder.is_dir() else []
    if args.index is not None:
        logs = [log for log in logs if log.name.startswith(f"{args.index:03d}-")]
    if not logs:
        print(f"tinkops-agent: no logs for workflow {args.workflow!r} in {folder}", file=sys.stderr)
        return 1
    for path in logs:
        print(f"==> {path.name} <==")
        sys.stdout.write(path.read_text(errors="replace"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["logs"]:
        return show_logs(argv[1:])
    args = build_parser().parse_args(argv)
    options = load_options(args)
    logging.basicConfig(
        level=logging.DEBUG if options.get("verbose") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # git runs in other folders, so every path the agent hands it must be absolute.
    state_dir = Path(options["state_dir"]).expanduser().resolve()
    key = Path(options["key"]).expanduser().resolve()
    if not key.is_file() or not os.access(key, os.R_OK):
        print(
            f"tinkops-agent: --key {key} is not a readable private key file; pass the key "
            "whose public half is in this machine's hardware record",
            file=sys.stderr,
        )
        return 2
    try:
        endpoint = Endpoint.parse(options["provisioner"])
    except ValueError as error:
        print(f"tinkops-agent: {error}", file=sys.stderr)
        return 2
    known_hosts = state_dir / "known_hosts"
    try:
        pin_host_key(
            endpoint,
            known_hosts,
            host_key=options.get("host_key"),
            host_key_fingerprint=options.get("host_key_fingerprint"),
            trust_on_first_use=bool(options.get("trust_on_first_use")),
        )
    except HostKeyError as error:
        print(f"tinkops-agent: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"tinkops-agent: cannot reach {endpoint.host}:{endpoint.port} to read its host "
            f"key: {error}",
            file=sys.stderr,
        )
        return 1

    local = _local_repository(state_dir / "repository.git")
    remote = Remote(
        local,
        options["provisioner"],
        ssh_command(key, known_hosts, control_dir=_control_dir(state_dir)),
    )
    timeout = float(options["default_timeout"])
    config = AgentConfig(
        worker_id=options["worker_id"],
        state_dir=state_dir,
        poll_interval=float(options["poll_interval"]),
        default_action_timeout=timeout if timeout > 0 else None,
        sign_events=_optional_bool(options.get("sign_events"), "sign_events"),
        signing_key=key,
    )
    stop = threading.Event()
    agent = Agent(config, local, remote, make_runtime(options), stop)

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d received; stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if options.get("once"):
        try:
            agent.replay_outbox()
            while agent.step() and not stop.is_set():
                pass
        except KeyRejected as error:
            print(f"tinkops-agent: {error}", file=sys.stderr)
            return 2
        except ConnectionError as error:
            print(f"tinkops-agent: {error}", file=sys.stderr)
            return 1
        return 0
    agent.run()
    return 0


def _optional_bool(value: object, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise SystemExit(f"tinkops-agent: {name} is {value!r}; expected true or false")


def _control_dir(state_dir: Path) -> Path | None:
    """Return a private folder for OpenSSH's shared connection, or None to connect each time.

    Unix socket paths are limited to about 100 bytes, so the folder lives in /tmp under a
    short name derived from the state folder rather than inside it.
    """
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"tinkops-ssh-{os.getuid()}-{digest}"
    # OpenSSH names the socket with %C (40 characters) plus a 17-character temporary
    # suffix while creating it; past 104 bytes the socket fails and every git command with
    # it, so a long temporary folder means connecting anew for every push instead.
    if len(str(folder)) + 1 + 40 + 17 > 104:
        log.warning(
            "%s is too long for an SSH control socket; connecting anew for every push", folder
        )
        return None
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
    except OSError as error:
        log.warning("cannot create %s (%s); connecting anew for every push", folder, error)
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("%s is not private to this user; connecting anew for every push", folder)
        return None
    return folder


def _local_repository(path: Path) -> GitRepo:
    if not (path / "HEAD").exists():
        path.mkdir(parents=True, exist_ok=True)
        GitRepo(path).run("init", "--quiet", "--bare")
    return GitRepo(path)


if __name__ == "__main__":
    sys.exit(main())
