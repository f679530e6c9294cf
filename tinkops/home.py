"""A provisioner's home folder: its configuration, and ``init``, which creates it.

A provisioner home holds::

    config.yaml           listen address, port, branch, push policy, limits, operators' keys
    host_ed25519_key      the SSH host key, generated once and kept
    repository.git/       the infrastructure repository (bare)
    keys/                 private keys that ``init`` generated (operator, agents)
    audit.log             one JSON line per push over SSH: who, which refs, the decision
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tinkops.errors import ConfigError
from tinkops.identities import generate_ed25519_key
from tinkops.limits import ServerLimits
from tinkops.prereceive import install_hooks
from tinkops.repository import HARDWARE_DIR, WORKFLOWS_DIR
from tinkops_agent.gitrepo import Identity, init_bare

CONFIG_FILE = "config.yaml"
HOST_KEY_FILE = "host_ed25519_key"
REPOSITORY_DIR = "repository.git"
KEYS_DIR = "keys"
AUDIT_LOG_FILE = "audit.log"
REPO_NAME = "tinkops.git"
DEFAULT_PORT = 2222
INIT_IDENTITY = Identity("tinkops init", "init@tinkops.invalid")
LAYOUT_DIR = Path(__file__).resolve().parent / "layout"


@dataclass
class Operator:
    name: str
    key: str


@dataclass
class ProvisionerConfig:
    home: Path
    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    branch: str = "main"
    poll_interval: float = 30.0
    timeout_grace: float = 10.0
    """Seconds after a workflow's global_timeout before the provisioner records TIMEOUT
    itself (the agent records it at the deadline when it is alive)."""
    allow_force_push_main: bool = False
    """Let operators push a main branch that does not contain the current one (a rewrite)."""
    archive_after_days: float | None = None
    """Move finished workflows older than this to refs/tinkops/archive/ (None: never)."""
    require_signed_events: bool = False
    """Accept only worker events signed by a key of the worker's hardware record."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    operators: list[Operator] = field(default_factory=list)

    @property
    def repository(self) -> Path:
        return self.home / REPOSITORY_DIR

    @property
    def host_key_path(self) -> Path:
        return self.home / HOST_KEY_FILE

    @property
    def audit_log_path(self) -> Path:
        return self.home / AUDIT_LOG_FILE

    def save(self) -> None:
        data = {
            "listen": self.listen,
            "port": self.port,
            "branch": self.branch,
            "poll_interval": self.poll_interval,
            "timeout_grace": self.timeout_grace,
            "allow_force_push_main": self.allow_force_push_main,
            "archive_after_days": self.archive_after_days,
            "require_signed_events": self.require_signed_events,
            "limits": self.limits.to_mapping(),
            "operators": [{"name": op.name, "key": op.key} for op in self.operators],
        }
        (self.home / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, home: Path) -> ProvisionerConfig:
        path = home / CONFIG_FILE
        if not path.exists():
            raise ConfigError(f"{path} not found; create a provisioner with 'tinkops init {home}'")
        try:
            data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
            unknown = sorted(set(data) - _CONFIG_KEYS)
            if unknown:
                raise ConfigError(
                    f"{path}: unknown keys {', '.join(map(str, unknown))} "
                    f"(known: {', '.join(sorted(_CONFIG_KEYS))})"
                )
            operators = [
                Operator(str(op["name"]), str(op["key"])) for op in data.get("operators") or []
            ]
            force_push = data.get("allow_force_push_main", False)
            signed = data.get("require_signed_events", False)
            for key, flag in (
                ("allow_force_push_main", force_push),
                ("require_signed_events", signed),
            ):
                if not isinstance(flag, bool):
                    raise ConfigError(f"{path}: {key} is {flag!r}; expected true or false")
            return cls(
                home=home,
                listen=str(data.get("listen", "127.0.0.1")),
                port=int(data.get("port", DEFAULT_PORT)),
                branch=str(data.get("branch", "main")),
                poll_interval=float(data.get("poll_interval", 30.0)),
                timeout_grace=float(data.get("timeout_grace", 10.0)),
                allow_force_push_main=force_push,
                require_signed_events=signed,
                archive_after_days=(
                    None
                    if data.get("archive_after_days") is None
                    else float(data["archive_after_days"])
                ),
                limits=ServerLimits.from_mapping(data.get("limits") or {}, str(path)),
                operators=operators,
            )
        except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ConfigError(
                f"{path}: {error}; fix the file or run 'tinkops init' again"
            ) from error


# Every field but the home folder is a key of config.yaml.
_CONFIG_KEYS = frozenset(f.name for f in fields(ProvisionerConfig)) - {"home"}


@dataclass(frozen=True)
class InitReport:
    home: Path
    agent_keys: dict[str, Path]
    operator_key: Path | None
    commit: str


def init_home(
    home: Path,
    *,
    layout: Path = LAYOUT_DIR,
    include_requests: bool = True,
    generate_agent_keys: bool = True,
    port: int = DEFAULT_PORT,
    branch: str = "main",
) -> InitReport:
    """Create a provisioner home with a repository started from ``layout``."""
    config = ProvisionerConfig(home=home, port=port, branch=branch)
    if config.repository.exists():
        raise ConfigError(f"{config.repository} already exists; choose another folder or remove it")
    home.mkdir(parents=True, exist_ok=True)
    keys = home / KEYS_DIR
    keys.mkdir(exist_ok=True, mode=0o700)

    files = _layout_files(layout, include_requests)
    agent_keys: dict[str, Path] = {}
    if generate_agent_keys:
        for path in sorted(files):
            if path.startswith(HARDWARE_DIR + "/"):
                name = Path(path).stem
                key_path = keys / f"agent-{name}"
                public = generate_ed25519_key(key_path, f"tinkops-agent@{name}")
                files[path] = set_agent_key(files[path].decode(), public).encode()
                agent_keys[name] = key_path

    operator_path = keys / "operator"
    operator_public = generate_ed25519_key(operator_path, "tinkops-operator")
    config.operators.append(Operator("operator", operator_public))

    repo = init_bare(config.repository, branch)
    tree = repo.write_tree(files)
    commit = repo.commit_tree(tree, [], "Start the infrastructure repository\n", INIT_IDENTITY)
    repo.update_ref(f"refs/heads/{branch}", commit, None)
    install_hooks(config.repository)

    generate_ed25519_key(config.host_key_path, "tinkops-provisioner")
    config.save()
    return InitReport(home, agent_keys, operator_path, commit)


def _layout_files(layout: Path, include_requests: bool) -> dict[str, bytes]:
    if not layout.is_dir():
        raise ConfigError(f"layout folder {layout} not found")
    files: dict[str, bytes] = {}
    for path in sorted(layout.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(layout).as_posix()
        if not include_requests and relative.startswith(WORKFLOWS_DIR + "/"):
            continue
        files[relative] = path.read_bytes()
    return files


_KEYS_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)keys:[^\n]*(?:\n(?P=indent)[ \t]*- [^\n]*)*", re.MULTILINE
)


def set_agent_key(text: str, public_key: str) -> str:
    """Return a hardware record's text with ``agent.keys`` set to ``public_key`` alone."""
    match = _KEYS_BLOCK.search(text)
    if match is None:
        suffix = "" if text.endswith("\n") else "\n"
        return f"{text}{suffix}agent:\n  keys:\n    - {public_key}\n"
    indent = match.group("indent")
    block = f"{indent}keys:\n{indent}  - {public_key}"
    return text[: match.start()] + block + text[match.end() :]
