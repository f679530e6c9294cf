"""The agent's link to the provisioner: stock ``git`` over OpenSSH, with a pinned host key.

The agent keeps a local bare repository. It fetches only its own queue and the workflows in it
(protocol v2 sends a ref prefix, so the cost does not grow with other machines' workflows),
and pushes one event commit at a time.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shlex
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tinkops_agent.gitrepo import GitError, GitRepo
from tinkops_agent.protocol import (
    SIGNED_EVENTS_FIELD,
    STATUS_FILE,
    STATUS_REF,
    queue_prefix,
    workflow_ref,
)

log = logging.getLogger(__name__)

LOCAL_QUEUE = "refs/provisioner/queue/"
LOCAL_WORKFLOWS = "refs/provisioner/workflows/"
LOCAL_STATUS = "refs/provisioner/status"
# The status ref is fetched with a pattern, which matches nothing when the ref does not
# exist yet; a fetch that names a missing ref exactly fails as a whole.
_STATUS_REFSPEC = f"+{STATUS_REF}*:{LOCAL_STATUS}*"


class HostKeyError(RuntimeError):
    """The provisioner's host key is not the one the agent was told to trust."""


class KeyRejected(ConnectionError):
    """The provisioner does not accept the agent's key."""


class PushOutcome(Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    """The provisioner refused the update (another writer moved the ref, or policy)."""
    UNREACHABLE = "unreachable"
    """The push did not complete; retry later."""


@dataclass(frozen=True)
class PushResult:
    outcome: PushOutcome
    detail: str = ""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname:
            raise ValueError(f"provisioner URL {url!r} is not ssh://HOST[:PORT]/PATH")
        return cls(parts.hostname, parts.port or 22, parts.path or "/")

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def fingerprint(key_blob: bytes) -> str:
    """Return OpenSSH's SHA256 fingerprint of a public key blob."""
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def fetch_host_key(endpoint: Endpoint, timeout: float = 10.0) -> str:
    """Return the provisioner's host key as ``type base64``, read over a bare SSH handshake."""
    import paramiko

    with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=timeout)
            key = transport.get_remote_server_key()
            return f"{key.get_name()} {key.get_base64()}"
        finally:
            transport.close()


def pin_host_key(
    endpoint: Endpoint,
    known_hosts: Path,
    *,
    host_key: str | None,
    host_key_fingerprint: str | None,
    trust_on_first_use: bool,
) -> None:
    """Write ``known_hosts`` holding the one host key the agent trusts.

    Exactly one source must decide: the full key, its SHA256 fingerprint (checked against the
    key the provisioner presents), or, only when explicitly allowed, whatever key it presents
    the first time (kept afterwards).
    """
    if host_key:
        key = " ".join(host_key.split()[:2])
    elif host_key_fingerprint:
        key = fetch_host_key(endpoint)
        actual = fingerprint(base64.b64decode(key.split()[1]))
        if actual != host_key_fingerprint.strip():
            raise HostKeyError(
                f"provisioner {endpoint.host}:{endpoint.port} presented host key {actual}, "
                f"expected {host_key_fingerprint}; check the fingerprint with "
                "'tinkops serve --show-host-key' on the provisioner"
            )
    elif trust_on_first_use:
        if known_hosts.exists() and known_hosts.read_text().strip():
            return
        key = fetch_host_key(endpoint)
        log.warning(
            "trusting the provisioner's host key on first use: %s",
            fingerprint(base64.b64decode(key.split()[1])),
        )
    else:
        raise HostKeyError(
            "no provisioner host key given: pass --host-key, "
            "--host-key-fingerprint, or --trust-on-first-use"
        )
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.write_text(f"{endpoint.known_hosts_name} {key}\n")


def ssh_command(
    key: Path, known_hosts: Path, *, connect_timeout: int = 10, control_dir: Path | None = None
) -> str:
    """Return the GIT_SSH_COMMAND that authenticates with ``key`` and trusts only the pinned key.

    With ``control_dir``, OpenSSH keeps one connection open (ControlMaster) and runs every
    later fetch and push over it: a new connection costs a key exchange (60 to 240 ms on
    loopback), a reused one almost nothing. The folder must belong to this agent alone,
    because the socket is chosen by host and port, not by key.
    """
    options = [
        "ssh",
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"ConnectTimeout={connect_timeout}",
        "-o",
        "ServerAliveInterval=15",
        "-F",
        "/dev/null",
    ]
    if control_dir is not None:
        options += [
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={control_dir}/%C",
            "-o",
            "ControlPersist=60",
        ]
    return shlex.join(options)


class Remote:
    """Fetches and pushes the agent's workflows between ``local`` and the provisioner."""

    def __init__(self, local: GitRepo, url: str, ssh: str) -> None:
        self.local = local
        self.url = url
        self.env = {"GIT_SSH_COMMAND": ssh, "GIT_PROTOCOL": "version=2"}
        self._status_commit: str | None = None
        self._signatures_required = False

    def fetch_queue(self, worker: str) -> dict[str, str]:
        """Fetch this worker's queue and return ``{workflow id: first commit}``.

        The provisioner's status ref comes along in the same fetch, for
        ``signatures_required``.
        """
        prefix = queue_prefix(worker)
        self._git(
            "fetch",
            "--quiet",
            "--prune",
            "--no-tags",
            self.url,
            f"+{prefix}*:{LOCAL_QUEUE}*",
            _STATUS_REFSPEC,
        )
        return {ref[len(LOCAL_QUEUE) :]: sha for ref, sha in self.local.refs(LOCAL_QUEUE).items()}

    @property
    def signatures_required(self) -> bool:
        """Whether the provisioner's status, as last fetched, requires signed events."""
        commit = self.local.rev_parse(LOCAL_STATUS)
        if commit != self._status_commit:
            self._status_commit = commit
            self._signatures_required = _requires_signatures(self.local, commit)
        return self._signatures_required

    def fetch_workflows(self, workflow_ids: list[str]) -> dict[str, str]:
        """Fetch the tips of these workflows and return ``{id: tip commit}``."""
        if not workflow_ids:
            return {}
        refspecs = [f"+{workflow_ref(i)}:{LOCAL_WORKFLOWS}{i}" for i in workflow_ids]
        self._git("fetch", "--quiet", "--no-tags", self.url, *refspecs)
        tips = {}
        for workflow_id in workflow_ids:
            sha = self.local.rev_parse(LOCAL_WORKFLOWS + workflow_id)
            if sha:
                tips[workflow_id] = sha
        return tips

    def push(self, commit: str, workflow_id: str) -> PushResult:
        """Push ``commit`` as the workflow's new tip; the provisioner takes fast-forwards only."""
        ref = workflow_ref(workflow_id)
        result = self.local.execute(
            "push", "--porcelain", "--quiet", self.url, f"{commit}:{ref}", env=self.env
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode == 0:
            self.local.run("update-ref", LOCAL_WORKFLOWS + workflow_id, commit)
            return PushResult(PushOutcome.ACCEPTED)
        if "[rejected]" in output or "[remote rejected]" in output or "! " in output:
            return PushResult(PushOutcome.REJECTED, _last_lines(output))
        return PushResult(PushOutcome.UNREACHABLE, _last_lines(output))

    def _git(self, *args: str) -> None:
        try:
            self.local.run(*args, env=self.env)
        except GitError as error:
            if "Permission denied" in error.stderr:
                raise KeyRejected(
                    "the provisioner rejected this agent's key; add its public key to "
                    "agent.keys of this machine's hardware record (and check --key)"
                ) from error
            if "Host key verification failed" in error.stderr:
                raise ConnectionError(
                    "the provisioner's host key does not match the pinned one; check "
                    "--host-key / --host-key-fingerprint"
                ) from error
            raise ConnectionError(
                f"git {args[0]} from the provisioner failed: {_last_lines(error.stderr)}"
            ) from error


def _requires_signatures(repo: GitRepo, commit: str | None) -> bool:
    text = repo.read_file(commit, STATUS_FILE) if commit else None
    if text is None:
        return False
    try:
        status = yaml.safe_load(text)
    except yaml.YAMLError as error:
        log.warning("the provisioner's %s is unreadable: %s", STATUS_FILE, error)
        return False
    return isinstance(status, dict) and status.get(SIGNED_EVENTS_FIELD) is True


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])
