"""The provisioner's SSH endpoint: fetch and push of one git repository, and nothing else.

Clients authenticate by public key only; a KeyDirectory maps the key to a Principal. The only
thing a session can do is exec ``git-upload-pack`` or ``git-receive-pack`` on the served
repository. ``tinkops.sshconnection`` handles each connection's requests, and
``tinkops.gitsession`` parses the command and relays the child. The pusher's
identity, the push policy's settings and the audit log's path reach the pre-receive hook as
TINKOPS_* environment variables, and the hook (``tinkops.prereceive``) decides what a push may
change. Shells, ptys, subsystems, X11, agent and port forwarding are all rejected, and
``ServerLimits`` bounds connections, channels, commands, time and pack size.

Threads: one thread accepts connections. Each connection has a thread that watches its login,
failed attempts, idle time and total time, beside paramiko's own transport thread. Each git
command has one thread that waits for the child and three that copy the streams.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import paramiko

from tinkops.audit import (
    AuditRecord,
    Decision,
    Stage,
    append_record,
    log_record,
    ref_changes,
)
from tinkops.errors import ConfigError
from tinkops.gitsession import GitService, GitSession
from tinkops.identities import (
    KeyDirectory,
    Principal,
    Role,
    key_fingerprint,
    principal_environment,
)
from tinkops.limits import ServerLimits
from tinkops.prereceive import (
    ENV_AUDIT_RECORD,
    ENV_REMOTE_ADDRESS,
    HookSettings,
    install_hooks,
)
from tinkops.sshconnection import SSHConnection

log = logging.getLogger(__name__)

# Variables of the server's own environment that would point git at another repository or
# fake the pusher's identity. The child never inherits them.
_WITHHELD_VARIABLES = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_COMMON_DIR",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_QUARANTINE_PATH",
        "GIT_NAMESPACE",
        "GIT_PROTOCOL",
    }
)

_POLL_SECONDS = 0.2
# Connections rejected because the server is full are logged at most once per interval.
_CROWDED_LOG_INTERVAL = 5.0


_HIDDEN_FROM_OPERATORS = ("refs/tinkops/",)
_HIDDEN_FROM_WORKERS = (
    "refs/heads/",
    "refs/tags/",
    "refs/tinkops/queue/",
    "refs/tinkops/status",
    "refs/tinkops/archive/",
    "refs/tinkops/rejected/",
)


class GitSSHServer:
    """An SSH server that serves ``repository`` (a bare git repository) to git clients.

    ``on_push`` runs after every receive-pack that exits 0, before the client's channel
    closes, so keep it short (for example, wake the reconciler). receive-pack also exits 0
    when the pre-receive hook rejected every ref, so the call means that refs may have moved.
    Every push is audited: the hook writes its decision, and the server logs it on the
    ``tinkops.audit`` logger (see ``tinkops.audit``). Usable as a context manager.
    """

    def __init__(
        self,
        repository: Path,
        host_key: paramiko.PKey,
        keys: KeyDirectory,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        repo_name: str = "tinkops.git",
        on_push: Callable[[Principal], None] | None = None,
        install_hook: bool = True,
        limits: ServerLimits | None = None,
        hook_settings: HookSettings | None = None,
    ) -> None:
        if not (repository / "HEAD").is_file():
            raise ConfigError(
                f"{repository} is not a git repository (it has no HEAD file); "
                "create it with 'git init --bare'"
            )
        git = shutil.which("git")
        if git is None:
            raise ConfigError("git is not installed or not on PATH; the SSH server runs it")
        self.repository = repository.resolve()
        self.keys = keys
        self.repo_name = repo_name
        self.on_push = on_push
        self.limits = limits or ServerLimits()
        self.hook_settings = hook_settings or HookSettings()
        self._git = git
        self._host_key = host_key
        self._address = (host, port)
        self._install_hook = install_hook

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[threading.Thread, paramiko.Transport] = {}
        self._connections_per_key: dict[str, int] = {}
        self._sessions_per_key: dict[str, int] = {}
        self._handoff_dir: Path | None = None
        self._crowded_count = 0
        self._crowded_logged_at = 0.0

    @property
    def port(self) -> int:
        """The TCP port the server listens on (the bound one when started with port 0)."""
        if self._listener is None:
            raise RuntimeError("the SSH server is not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def stop_event(self) -> threading.Event:
        return self._stopping

    @property
    def open_connections(self) -> int:
        """The number of client connections open now, authenticated or not."""
        with self._lock:
            return len(self._connections)

    def start(self) -> None:
        """Install the policy hook, bind the port and accept connections in the background."""
        if self._install_hook:
            install_hooks(self.repository)
        # The hooks leave their audit records here for the server; the folder is private.
        self._handoff_dir = Path(tempfile.mkdtemp(prefix="tinkops-push-"))
        self._listener = socket.create_server(self._address)
        self._listener.settimeout(_POLL_SECONDS)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="tinkops-ssh-accept", daemon=True
        )
        self._accept_thread.start()
        log.info(
            "SSH server serves %s as %r on %s:%d (host key %s)",
            self.repository,
            self.repo_name,
            self._address[0],
            self.port,
            key_fingerprint(self._host_key),
        )

    def stop(self) -> None:
        """Close the listener and every connection, end running git commands, join threads."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = dict(self._connections)
        for transport in connections.values():
            transport.close()
        for thread in connections:
            thread.join()
        if self._handoff_dir is not None:
            shutil.rmtree(self._handoff_dir, ignore_errors=True)
        log.info("SSH server on port %s stopped", self._address[1] or "(ephemeral)")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- connections ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                log.error("SSH server stops accepting connections: %s", error)
                return
            peer = f"{address[0]}:{address[1]}"
            with self._lock:
                crowded = len(self._connections) >= self.limits.max_connections
            if crowded:
                sock.close()
                self._log_crowded(peer)
                continue
            log.info("connection from %s", peer)
            self._start_connection(sock, peer)

    def _log_crowded(self, peer: str) -> None:
        self._crowded_count += 1
        now = time.monotonic()
        if now - self._crowded_logged_at < _CROWDED_LOG_INTERVAL:
            return
        log.warning(
            "rejected %d connection(s), the latest from %s: %d connections are open "
            "(max_connections)",
            self._crowded_count,
            peer,
            self.limits.max_connections,
        )
        self._crowded_count = 0
        self._crowded_logged_at = now

    def _start_connection(self, sock: socket.socket, peer: str) -> None:
        transport = paramiko.Transport(sock)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(transport, peer),
            name=f"tinkops-ssh-{peer}",
            daemon=True,
        )
        with self._lock:
            self._connections[thread] = transport
        thread.start()

    def _serve_connection(self, transport: paramiko.Transport, peer: str) -> None:
        connection = SSHConnection(self, peer)
        try:
            transport.add_server_key(self._host_key)
            # With an event, negotiation runs in paramiko's thread and _watch enforces the
            # login deadline even on a client that stalls during key exchange.
            transport.start_server(event=threading.Event(), server=connection)
            self._watch(transport, connection)
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            transport.close()
            connection.finish()
            with self._lock:
                self._connections.pop(threading.current_thread(), None)
            log.info("connection from %s closed", peer)

    def _watch(self, transport: paramiko.Transport, connection: SSHConnection) -> None:
        """Return when the connection is over, or must be closed for a limit."""
        limits = self.limits
        login_deadline = connection.started + limits.login_timeout
        while transport.is_active() and not self._stopping.is_set():
            # Channels start their work from the exec request. The connection keeps a reference
            # to each, because paramiko closes a channel once it is garbage collected.
            channel = transport.accept(timeout=_POLL_SECONDS)
            connection.keep(channel)
            now = time.monotonic()
            if connection.closing_reason:
                log.info(
                    "closing connection from %s: %s", connection.peer, connection.closing_reason
                )
                return
            if transport.is_authenticated():
                if not connection.admit():
                    return
                if connection.idle_seconds() > limits.idle_timeout:
                    log.info("closing idle connection from %s", connection.peer)
                    return
                if now > connection.deadline:
                    log.info(
                        "closing connection from %s: open for more than %.0f s "
                        "(max_connection_time)",
                        connection.peer,
                        limits.max_connection_time,
                    )
                    return
            elif connection.failed_auths >= limits.max_auth_attempts:
                log.info(
                    "closing connection from %s after %d failed authentication attempts",
                    connection.peer,
                    connection.failed_auths,
                )
                return
            elif now > login_deadline:
                log.info(
                    "closing connection from %s: no authentication within %.0f s",
                    connection.peer,
                    limits.login_timeout,
                )
                return

    # --- per-key counts ---------------------------------------------------------------------

    def acquire_connection(self, fingerprint: str) -> bool:
        """Count an authenticated connection for a key. Returns False at the key's maximum."""
        return self._acquire(
            self._connections_per_key, fingerprint, self.limits.max_connections_per_key
        )

    def release_connection(self, fingerprint: str) -> None:
        self._release(self._connections_per_key, fingerprint)

    def acquire_session(self, fingerprint: str) -> bool:
        """Count a new git command for a key. Returns False when the key is at its maximum."""
        return self._acquire(self._sessions_per_key, fingerprint, self.limits.max_sessions_per_key)

    def release_session(self, fingerprint: str) -> None:
        self._release(self._sessions_per_key, fingerprint)

    def _acquire(self, counts: dict[str, int], fingerprint: str, maximum: int) -> bool:
        with self._lock:
            running = counts.get(fingerprint, 0)
            if running >= maximum:
                return False
            counts[fingerprint] = running + 1
            return True

    def _release(self, counts: dict[str, int], fingerprint: str) -> None:
        with self._lock:
            running = counts.get(fingerprint, 0) - 1
            if running > 0:
                counts[fingerprint] = running
            else:
                counts.pop(fingerprint, None)

    # --- git commands -----------------------------------------------------------------------

    def git_argv(self, service: GitService, role: Role | None = None) -> list[str]:
        if service is GitService.UPLOAD_PACK:
            return [self._git, "upload-pack", "--strict", str(self.repository)]
        # receive-pack has no protocol v2: it lists every ref it does not hide before a push.
        # With one ref per workflow that list is long, so each role sees only the refs it
        # may update (the policy rejects the others anyway, and git refuses hidden ones).
        hidden = _HIDDEN_FROM_OPERATORS if role is Role.OPERATOR else _HIDDEN_FROM_WORKERS
        return [
            self._git,
            *[arg for prefix in hidden for arg in ("-c", f"receive.hideRefs={prefix}")],
            # fsck rejects malformed objects (for example tree entries named ".." or ".git")
            # before they reach the repository that agents and operators check out.
            "-c",
            "receive.fsckObjects=true",
            # index-pack or unpack-objects stops reading a larger pack, before the hook runs.
            "-c",
            f"receive.maxInputSize={self.limits.max_pack_size}",
            # The policy hook runs even when the server user's git config moves the hooks.
            "-c",
            f"core.hooksPath={self.repository / 'hooks'}",
            "receive-pack",
            str(self.repository),
        ]

    def child_environment(
        self,
        principal: Principal,
        git_protocol: str | None,
        peer: str,
        handoff: Path | None = None,
    ) -> dict[str, str]:
        """Return a git child's environment: the server's own, the principal, the policy's
        settings, the client's address and the protocol."""
        environment = {
            name: value
            for name, value in os.environ.items()
            if name not in _WITHHELD_VARIABLES and not name.startswith("TINKOPS_")
        }
        environment.update(principal_environment(principal))
        environment.update(self.hook_settings.environment())
        environment[ENV_REMOTE_ADDRESS] = peer
        if handoff is not None:
            environment[ENV_AUDIT_RECORD] = str(handoff)
        if git_protocol:
            environment["GIT_PROTOCOL"] = git_protocol
        return environment

    def handoff_path(self) -> Path:
        """Return a new path where one receive-pack's hook leaves its audit record."""
        if self._handoff_dir is None:
            raise RuntimeError("the SSH server is not started")
        return self._handoff_dir / f"{uuid.uuid4().hex}.json"

    def command_exited(
        self, principal: Principal, handoff: Path | None, session: GitSession, status: int
    ) -> None:
        """Audit a finished push and call ``on_push`` when receive-pack succeeded."""
        if session.service is not GitService.RECEIVE_PACK:
            return
        self._audit_push(principal, session, status, handoff)
        if status == 0 and self.on_push is not None:
            try:
                self.on_push(principal)
            except Exception:
                log.exception(
                    "the push callback failed for %s (%s)", principal.name, principal.fingerprint
                )

    def _audit_push(
        self, principal: Principal, session: GitSession, status: int, handoff: Path | None
    ) -> None:
        record = _read_handoff(handoff) if handoff is not None else None
        if record is None:
            if not session.commands.updates:
                # The client requested no ref update (nothing to push, or it hung up early).
                return
            failure = session.failure_message() or (
                f"receive-pack exited with status {status} without a decision of the push policy"
            )
            record = AuditRecord(
                decision=Decision.REJECTED,
                stage=Stage.RECEIVE_PACK,
                role=principal.role.value,
                principal=principal.name,
                fingerprint=principal.fingerprint,
                worker_ids=principal.worker_ids,
                remote_address=session.peer,
                refs=ref_changes(session.commands.updates),
                reasons=(f"rejected push: {failure}",),
            )
            audit_log = self.hook_settings.audit_log
            if audit_log is not None:
                try:
                    append_record(audit_log, record)
                except OSError as error:
                    log.error("writing the audit log %s failed: %s", audit_log, error)
        log_record(record)


def _read_handoff(path: Path) -> AuditRecord | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        log.error("reading the hook's audit record %s failed: %s", path, error)
        return None
    finally:
        path.unlink(missing_ok=True)
    try:
        return AuditRecord.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as error:
        log.error("the hook's audit record %s is invalid: %s", path, error)
        return None
