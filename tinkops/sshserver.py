"""The provisioner's SSH endpoint: fetch and push of one git repository, and nothing else.

Clients authenticate by public key only; a KeyDirectory maps the key to a Principal. The only
thing a session can do is exec ``git-upload-pack`` or ``git-receive-pack`` on the served
repository. The server runs the stock ``git`` for it and relays the channel to the child's
stdin, stdout and stderr. The pusher's identity reaches the pre-receive hook as TINKOPS_*
environment variables, and the hook (``tinkops.prereceive``) decides what a push may change.
Shells, ptys, subsystems, X11, agent and port forwarding are all rejected.

Threads: one thread accepts connections. Each connection has a thread that watches its login,
failed attempts and idle time, beside paramiko's own transport thread. Each git command has
one thread that waits for the child and three that copy the streams.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)
from paramiko.server import InteractiveQuery

from tinkops.errors import ConfigError, TinkopsError
from tinkops.identities import KeyDirectory, Principal, key_fingerprint, principal_environment
from tinkops.prereceive import install_hooks

log = logging.getLogger(__name__)

# git sends GIT_PROTOCOL as colon-separated keys with optional values, for example "version=2".
GIT_PROTOCOL_PATTERN = re.compile(r"version=[0-9]+(?::[A-Za-z0-9._=-]+)*")
MAX_GIT_PROTOCOL_LENGTH = 256
MAX_COMMAND_LENGTH = 1024
# Everything a git client puts in its exec command: the command name, and a path that git
# wraps in single quotes. Any other character (shell syntax, control characters) is rejected.
_COMMAND_CHARACTERS = re.compile(r"[A-Za-z0-9 ._/~'\"-]*")

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

_READ_SIZE = 64 * 1024
_POLL_SECONDS = 0.2
# Seconds the child gets to exit after SIGTERM before SIGKILL, and the output pumps get to
# finish after the child exited.
_TERMINATE_GRACE = 5.0
_DRAIN_GRACE = 5.0
# A rejected command's channel is closed this long after its exit status, because paramiko
# sends the exec request's reply only after the callback returns. A close that overtakes the
# reply makes clients report an unknown channel or a failed exec.
_REJECT_CLOSE_DELAY = 0.05


class GitService(enum.Enum):
    """The git programs a client may run."""

    UPLOAD_PACK = "upload-pack"
    RECEIVE_PACK = "receive-pack"


class CommandRejected(TinkopsError):
    """An exec request that is not fetch or push of the served repository."""


def parse_git_command(command: bytes, repo_name: str) -> GitService:
    """Return the git service that ``command`` requests, or raise CommandRejected.

    Accepted: ``git-upload-pack 'PATH'``, ``git-receive-pack 'PATH'`` and the spaced forms
    ``git upload-pack 'PATH'``, where PATH, after an optional leading ``/`` or ``~/``, is
    ``repo_name`` with or without its ``.git`` suffix.
    """
    served = f"this server serves only git fetch and push of {repo_name!r}"
    if len(command) > MAX_COMMAND_LENGTH:
        raise CommandRejected(f"command is {len(command)} bytes long; {served}")
    try:
        text = command.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandRejected(f"command is not UTF-8 text; {served}") from None
    if any(character in text for character in "\0\r\n"):
        raise CommandRejected(f"command contains a NUL or line break; {served}")
    if not _COMMAND_CHARACTERS.fullmatch(text):
        unexpected = sorted({c for c in text if not _COMMAND_CHARACTERS.fullmatch(c)})
        raise CommandRejected(f"command contains {''.join(unexpected)!r}; {served}")
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise CommandRejected(f"command cannot be parsed ({error}); {served}") from None

    if len(words) >= 2 and words[0] == "git":
        program, arguments = f"git-{words[1]}", words[2:]
    elif words:
        program, arguments = words[0], words[1:]
    else:
        raise CommandRejected(f"command is empty; {served}")
    services = {f"git-{service.value}": service for service in GitService}
    if program not in services:
        raise CommandRejected(f"{program!r} is not allowed; {served}")
    if len(arguments) != 1:
        raise CommandRejected(
            f"{program} takes exactly one argument, the repository path, "
            f"not {len(arguments)}; {served}"
        )

    path = arguments[0]
    relative = path.removeprefix("~/") if path.startswith("~/") else path.removeprefix("/")
    if ".." in relative.split("/"):
        raise CommandRejected(f"path {path!r} leaves the served folder; {served}")
    if relative not in (repo_name, repo_name.removesuffix(".git")):
        raise CommandRejected(f"repository {path!r} not found; {served}")
    return services[program]


class GitSSHServer:
    """An SSH server that serves ``repository`` (a bare git repository) to git clients.

    ``on_push`` runs after every receive-pack that exits 0, before the client's channel
    closes, so keep it short (for example, wake the reconciler). receive-pack also exits 0
    when the pre-receive hook rejected every ref, so the call means that refs may have moved.
    Usable as a context manager.
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
        max_connections: int = 256,
        max_sessions_per_key: int = 8,
        max_auth_attempts: int = 6,
        login_timeout: float = 30.0,
        idle_timeout: float = 300.0,
    ) -> None:
        # NOTE: the limits are starting points, not measurements. The 6 attempts follow OpenSSH's
        # MaxAuthTries and 30 s is a shorter LoginGraceTime. The other limits are guesses.
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
        self.max_connections = max_connections
        self.max_sessions_per_key = max_sessions_per_key
        self.max_auth_attempts = max_auth_attempts
        self.login_timeout = login_timeout
        self.idle_timeout = idle_timeout
        self._git = git
        self._host_key = host_key
        self._address = (host, port)
        self._install_hook = install_hook

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[threading.Thread, paramiko.Transport] = {}
        self._sessions_per_key: dict[str, int] = {}

    @property
    def port(self) -> int:
        """The TCP port the server listens on (the bound one when started with port 0)."""
        if self._listener is None:
            raise RuntimeError("the SSH server is not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        """Install the policy hook, bind the port and accept connections in the background."""
        if self._install_hook:
            install_hooks(self.repository)
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
                crowded = len(self._connections) >= self.max_connections
            if crowded:
                log.warning(
                    "rejected connection from %s: %d connections are open (the maximum)",
                    peer,
                    self.max_connections,
                )
                sock.close()
                continue
            log.info("connection from %s", peer)
            self._start_connection(sock, peer)

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
        connection = _Connection(self, peer)
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

    def _watch(self, transport: paramiko.Transport, connection: _Connection) -> None:
        """Return when the connection is over, or must be closed for a limit."""
        deadline = time.monotonic() + self.login_timeout
        authenticated = False
        while transport.is_active() and not self._stopping.is_set():
            # Channels start their work from the exec request. The connection keeps a reference
            # to each, because paramiko closes a channel once it is garbage collected.
            channel = transport.accept(timeout=_POLL_SECONDS)
            connection.keep(channel)
            if not authenticated and transport.is_authenticated():
                authenticated = True
                connection.log_authenticated()
            if authenticated:
                if connection.idle_seconds() > self.idle_timeout:
                    log.info("closing idle connection from %s", connection.peer)
                    return
            elif connection.failed_auths >= self.max_auth_attempts:
                log.info(
                    "closing connection from %s after %d failed authentication attempts",
                    connection.peer,
                    connection.failed_auths,
                )
                return
            elif time.monotonic() > deadline:
                log.info(
                    "closing connection from %s: no authentication within %.0f s",
                    connection.peer,
                    self.login_timeout,
                )
                return

    # --- sessions ---------------------------------------------------------------------------

    def acquire_session(self, fingerprint: str) -> bool:
        """Count a new git command for a key. Returns False when the key is at its maximum."""
        with self._lock:
            running = self._sessions_per_key.get(fingerprint, 0)
            if running >= self.max_sessions_per_key:
                return False
            self._sessions_per_key[fingerprint] = running + 1
            return True

    def release_session(self, fingerprint: str) -> None:
        with self._lock:
            running = self._sessions_per_key.get(fingerprint, 0) - 1
            if running > 0:
                self._sessions_per_key[fingerprint] = running
            else:
                self._sessions_per_key.pop(fingerprint, None)

    def git_argv(self, service: GitService) -> list[str]:
        if service is GitService.UPLOAD_PACK:
            return [self._git, "upload-pack", "--strict", str(self.repository)]
        # fsck rejects malformed objects (for example tree entries named ".." or ".git") before
        # they reach the repository that agents and operators check out.
        return [self._git, "-c", "receive.fsckObjects=true", "receive-pack", str(self.repository)]

    def child_environment(self, principal: Principal, git_protocol: str | None) -> dict[str, str]:
        """Return a git child's environment: the server's own, the principal, the protocol."""
        environment = {
            name: value
            for name, value in os.environ.items()
            if name not in _WITHHELD_VARIABLES and not name.startswith("TINKOPS_")
        }
        environment.update(principal_environment(principal))
        if git_protocol:
            environment["GIT_PROTOCOL"] = git_protocol
        return environment


class _Connection(paramiko.ServerInterface):
    """paramiko's callbacks for one client connection: authentication and channel requests."""

    def __init__(self, server: GitSSHServer, peer: str) -> None:
        self.server = server
        self.peer = peer
        self.failed_auths = 0
        # paramiko checks a key twice, once when the client offers it and once with its
        # signature, and reports success right after the signed check. So after a success,
        # this is the principal of the key that signed.
        self.principal: Principal | None = None
        self._lock = threading.Lock()
        self._git_protocols: dict[int, str] = {}
        self._sessions: dict[int, _GitSession] = {}
        self._closers: list[threading.Timer] = []
        self._channels: list[paramiko.Channel] = []
        self._announced = False
        self._last_activity = time.monotonic()

    # --- authentication ---------------------------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        return AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        self._count_failure("password authentication for user %r", username)
        return AUTH_FAILED

    def check_auth_interactive(self, username: str, submethods: str) -> int | InteractiveQuery:
        self._count_failure("keyboard-interactive authentication for user %r", username)
        return AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        fingerprint = key_fingerprint(key)
        if self.failed_auths >= self.server.max_auth_attempts:
            return AUTH_FAILED
        try:
            principal = self.server.keys.lookup(key)
        except Exception:
            log.exception("looking up key %s from %s failed", fingerprint, self.peer)
            principal = None
        if principal is None:
            self._count_failure(
                "unknown %s key %s for user %r", key.get_name(), fingerprint, username
            )
            return AUTH_FAILED
        self.principal = principal
        return AUTH_SUCCESSFUL

    def _count_failure(self, description: str, *args: object) -> None:
        self.failed_auths += 1
        log.info("rejected " + description + " from %s", *args, self.peer)

    def log_authenticated(self) -> None:
        """Log the successful login once, from the watcher or from the first channel request."""
        principal = self.principal
        with self._lock:
            if principal is None or self._announced:
                return
            self._announced = True
        log.info(
            "%s authenticated as %s %r with key %s",
            self.peer,
            principal.role.value,
            principal.name,
            principal.fingerprint,
        )

    # --- requests that are always rejected --------------------------------------------------

    def _reject(self, request: str, *args: object) -> bool:
        log.info("rejected %s request from %s", request % args if args else request, self.peer)
        return False

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and self.principal is not None:
            self.log_authenticated()
            self.touch()
            return OPEN_SUCCEEDED
        self._reject("%r channel", kind)
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(
        self, chanid: int, origin: tuple[str, int], destination: tuple[str, int]
    ) -> int:
        self._reject("port forwarding (to %s:%d)", *destination)
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_port_forward_request(self, address: str, port: int) -> int:
        self._reject("remote port forwarding (from %s:%d)", address, port)
        return False

    def check_global_request(
        self, kind: str, msg: paramiko.Message
    ) -> bool | tuple[bool | int | str, ...]:
        # OpenSSH clients send keepalives as unknown global requests. Failing them is the
        # expected reply, so they are not worth a log line each.
        if kind.startswith("keepalive@"):
            return False
        return self._reject("global %r", kind)

    def check_channel_pty_request(
        self,
        channel: paramiko.Channel,
        term: bytes,
        width: int,
        height: int,
        pixelwidth: int,
        pixelheight: int,
        modes: bytes,
    ) -> bool:
        return self._reject("pty")

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return self._reject("shell")

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return self._reject("subsystem %r", name)

    def check_channel_x11_request(
        self,
        channel: paramiko.Channel,
        single_connection: bool,
        auth_protocol: str,
        auth_cookie: bytes,
        screen_number: int,
    ) -> bool:
        return self._reject("X11 forwarding")

    def check_channel_forward_agent_request(self, channel: paramiko.Channel) -> bool:
        return self._reject("agent forwarding")

    def check_channel_window_change_request(
        self,
        channel: paramiko.Channel,
        width: int,
        height: int,
        pixelwidth: int,
        pixelheight: int,
    ) -> bool:
        return self._reject("window change")

    # --- git --------------------------------------------------------------------------------

    def check_channel_env_request(
        self, channel: paramiko.Channel, name: bytes, value: bytes
    ) -> bool:
        text = value.decode("ascii", errors="replace")
        if (
            name == b"GIT_PROTOCOL"
            and len(value) <= MAX_GIT_PROTOCOL_LENGTH
            and GIT_PROTOCOL_PATTERN.fullmatch(text)
        ):
            with self._lock:
                self._git_protocols[channel.get_id()] = text
            return True
        return self._reject("environment variable %r", name.decode("ascii", errors="replace"))

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        principal = self.principal
        chanid = channel.get_id()
        if principal is None:
            return self._reject("exec before authentication")
        with self._lock:
            if chanid in self._sessions:
                return self._reject("second exec on channel %d", chanid)

        try:
            service = parse_git_command(command, self.server.repo_name)
        except CommandRejected as error:
            log.info(
                "rejected command %r from %s (%s): %s",
                command[:200],
                self.peer,
                principal.name,
                error,
            )
            self._fail_channel(channel, f"tinkops: {error}")
            return True
        if not self.server.acquire_session(principal.fingerprint):
            log.warning(
                "rejected %s from %s: key %s already runs %d git commands",
                service.value,
                self.peer,
                principal.fingerprint,
                self.server.max_sessions_per_key,
            )
            self._fail_channel(
                channel,
                "tinkops: too many concurrent sessions for this key; retry when one has finished",
            )
            return True

        log.info(
            "%s (%s %r) runs git %s",
            self.peer,
            principal.role.value,
            principal.name,
            service.value,
        )
        with self._lock:
            git_protocol = self._git_protocols.pop(chanid, None)
            session = _GitSession(self, channel, principal, service, git_protocol)
            self._sessions[chanid] = session
        session.start()
        return True

    def _fail_channel(self, channel: paramiko.Channel, message: str) -> None:
        """Report a rejected command to the client as a stderr message and exit status 1."""
        try:
            channel.sendall_stderr((message + "\n").encode())
            channel.send_exit_status(1)
        except OSError as error:
            log.info("could not report the rejection to %s: %s", self.peer, error)
        closer = threading.Timer(_REJECT_CLOSE_DELAY, channel.close)
        closer.daemon = True
        with self._lock:
            self._closers.append(closer)
        closer.start()

    # --- bookkeeping ------------------------------------------------------------------------

    def keep(self, channel: paramiko.Channel | None) -> None:
        """Hold ``channel`` while it is open, and drop the channels that have closed."""
        with self._lock:
            self._channels = [open_ for open_ in self._channels if not open_.closed]
            if channel is not None:
                self._channels.append(channel)

    def touch(self) -> None:
        self._last_activity = time.monotonic()

    def idle_seconds(self) -> float:
        with self._lock:
            if self._sessions:
                return 0.0
        return time.monotonic() - self._last_activity

    def session_ended(self, chanid: int) -> None:
        with self._lock:
            self._sessions.pop(chanid, None)
        self.touch()

    def finish(self) -> None:
        """Wait for this connection's git commands to end (the transport is closed by now)."""
        with self._lock:
            sessions = list(self._sessions.values())
            closers = list(self._closers)
        for closer in closers:
            closer.cancel()
        for session in sessions:
            session.join()


class _GitSession:
    """One git command: the child process and the threads that relay its streams."""

    def __init__(
        self,
        connection: _Connection,
        channel: paramiko.Channel,
        principal: Principal,
        service: GitService,
        git_protocol: str | None,
    ) -> None:
        self.connection = connection
        self.server = connection.server
        self.channel = channel
        self.principal = principal
        self.service = service
        self.git_protocol = git_protocol
        self._last_activity = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"tinkops-git-{connection.peer}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            self._relay()
        except Exception:
            log.exception("git %s for %s failed", self.service.value, self.connection.peer)
        finally:
            self.channel.close()
            self.server.release_session(self.principal.fingerprint)
            self.connection.session_ended(self.channel.get_id())

    def _relay(self) -> None:
        argv = self.server.git_argv(self.service)
        environment = self.server.child_environment(self.principal, self.git_protocol)
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
                cwd=self.server.repository,
                bufsize=0,
                start_new_session=True,
            )
        except OSError as error:
            log.error("starting %s failed: %s", argv, error)
            self.channel.sendall_stderr(b"tinkops: the server could not start git\n")
            self.channel.send_exit_status(1)
            return
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None

        pumps = [
            self._spawn(self._pump_input, process.stdin),
            self._spawn(self._pump_output, process.stdout, self.channel.sendall),
            self._spawn(self._pump_output, process.stderr, self.channel.sendall_stderr),
        ]
        status = self._wait(process)
        for pump in pumps[1:]:
            pump.join(_DRAIN_GRACE)
        process.stdout.close()
        process.stderr.close()

        exit_status = status if status >= 0 else 128 - status
        log.info(
            "git %s for %s exited with %d",
            self.service.value,
            self.connection.peer,
            exit_status,
        )
        try:
            self.channel.send_exit_status(exit_status)
        except OSError as error:
            log.info("could not send the exit status to %s: %s", self.connection.peer, error)
        if self.service is GitService.RECEIVE_PACK and status == 0:
            self._notify_push()

        # Closing the channel ends the input pump's recv.
        self.channel.close()
        pumps[0].join(_DRAIN_GRACE)
        process.stdin.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=self._guarded, args=(target, *args), daemon=True)
        thread.start()
        return thread

    def _guarded(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except Exception:
            log.exception("relaying git %s for %s failed", self.service.value, self.connection.peer)

    def _pump_input(self, stdin: IO[bytes]) -> None:
        """Copy the channel to the child's stdin, and close stdin at the client's EOF."""
        try:
            while data := self.channel.recv(_READ_SIZE):
                self._last_activity = time.monotonic()
                view = memoryview(data)
                while view:
                    written = stdin.write(view)
                    view = view[written or 0 :]
        except (BrokenPipeError, ValueError):
            # The child exited (or its stdin was closed) before reading everything.
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    def _pump_output(self, stream: IO[bytes], send: Callable[[bytes], None]) -> None:
        """Copy a child's output stream to the channel until EOF.

        When the channel is gone, the rest is read and dropped, so the child does not block on
        a full pipe and can finish what it started (for example a ref update).
        """
        connected = True
        while data := stream.read(_READ_SIZE):
            self._last_activity = time.monotonic()
            if not connected:
                continue
            try:
                send(data)
            except OSError as error:
                log.info(
                    "client %s went away during git %s: %s",
                    self.connection.peer,
                    self.service.value,
                    error,
                )
                connected = False

    def _wait(self, process: subprocess.Popen[bytes]) -> int:
        """Wait for the child, and end it when the server stops or the session stays idle."""
        while True:
            try:
                return process.wait(timeout=_POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            if self.server.stopping:
                log.info(
                    "ending git %s for %s: the server stops",
                    self.service.value,
                    self.connection.peer,
                )
                return _terminate(process)
            idle = time.monotonic() - self._last_activity
            if idle > self.server.idle_timeout:
                log.info(
                    "ending git %s for %s: idle for %.0f s",
                    self.service.value,
                    self.connection.peer,
                    idle,
                )
                return _terminate(process)

    def _notify_push(self) -> None:
        if self.server.on_push is None:
            return
        try:
            self.server.on_push(self.principal)
        except Exception:
            log.exception(
                "the push callback failed for %s (%s)",
                self.principal.name,
                self.principal.fingerprint,
            )


def _terminate(process: subprocess.Popen[bytes]) -> int:
    """End the child and its hooks (its process group): SIGTERM, then SIGKILL after a grace."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(timeout=_TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()
    except ProcessLookupError:
        return process.wait()
