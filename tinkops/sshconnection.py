"""One client connection of the SSH endpoint: paramiko's callbacks for it.

``SSHConnection`` authenticates the client's key against the server's KeyDirectory, accepts
session channels, one exec of git per channel and the GIT_PROTOCOL variable, rejects every
other request, and starts a ``GitSession`` for each accepted command. It counts what it
rejects, so that ``GitSSHServer``'s watcher can close a connection that keeps trying.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import TYPE_CHECKING

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_RESOURCE_SHORTAGE,
    OPEN_SUCCEEDED,
)
from paramiko.server import InteractiveQuery

from tinkops.gitsession import CommandRejected, GitService, GitSession, parse_git_command
from tinkops.identities import Principal, key_fingerprint

if TYPE_CHECKING:
    from tinkops.sshserver import GitSSHServer

log = logging.getLogger(__name__)

# git sends GIT_PROTOCOL as colon-separated keys with optional values, for example "version=2".
GIT_PROTOCOL_PATTERN = re.compile(r"version=[0-9]+(?::[A-Za-z0-9._=-]+)*")
MAX_GIT_PROTOCOL_LENGTH = 256
# A git client sends one environment request (GIT_PROTOCOL); OpenSSH's SendEnv a few more.
MAX_ENV_REQUESTS_PER_CHANNEL = 8
# Rejected requests (channels, env, exec, pty, forwarding ...) of one connection that are
# logged one by one; later ones are counted. After the maximum the connection is closed.
LOGGED_REJECTIONS = 16
MAX_REJECTED_REQUESTS = 64

# A rejected command's channel is closed this long after its exit status, because paramiko
# sends the exec request's reply only after the callback returns. A close that overtakes the
# reply makes clients report an unknown channel or a failed exec.
_REJECT_CLOSE_DELAY = 0.05


class SSHConnection(paramiko.ServerInterface):
    """paramiko's callbacks for one client connection: authentication and channel requests."""

    def __init__(self, server: GitSSHServer, peer: str) -> None:
        self.server = server
        self.peer = peer
        self.limits = server.limits
        self.started = time.monotonic()
        self.deadline = self.started + self.limits.max_connection_time
        self.failed_auths = 0
        # paramiko checks a key twice, once when the client offers it and once with its
        # signature, reports success right after the signed check, and ignores every
        # authentication request after a success. So after a success, this is the principal of
        # the key that signed.
        self.principal: Principal | None = None
        # Set when the connection must be closed; the watcher closes it.
        self.closing_reason = ""
        self._lock = threading.Lock()
        self._admitted: bool | None = None
        self._open_channels: set[int] = set()
        self._exec_channels: set[int] = set()
        self._env_requests: dict[int, int] = {}
        self._git_protocols: dict[int, str] = {}
        self._sessions: dict[int, GitSession] = {}
        self._closers: list[threading.Timer] = []
        self._channels: list[paramiko.Channel] = []
        self._rejected_requests = 0
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
        if self.failed_auths >= self.limits.max_auth_attempts:
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

    def admit(self) -> bool:
        """Count this authenticated connection against its key's maximum, once.

        Returns False, and marks the connection for closing, when the key already has
        ``max_connections_per_key`` connections open. Called by the watcher and by the first channel
        request, whichever comes first.
        """
        principal = self.principal
        if principal is None:
            return False
        with self._lock:
            if self._admitted is not None:
                return self._admitted
            self._admitted = self.server.acquire_connection(principal.fingerprint)
        if not self._admitted:
            self.closing_reason = (
                f"key {principal.fingerprint} ({principal.name}) already has "
                f"{self.limits.max_connections_per_key} connections open (max_connections_per_key)"
            )
            log.warning("rejected connection from %s: %s", self.peer, self.closing_reason)
            return False
        log.info(
            "%s authenticated as %s %r with key %s",
            self.peer,
            principal.role.value,
            principal.name,
            principal.fingerprint,
        )
        return True

    # --- requests that are always rejected --------------------------------------------------

    def _reject(self, request: str, *args: object) -> bool:
        """Log a rejected request, with repeats counted, and return False (rejected)."""
        if self._count_rejection():
            log.info("rejected %s request from %s", request % args if args else request, self.peer)
        return False

    def _count_rejection(self) -> bool:
        """Count a rejected request, mark the connection for closing after too many, and
        return whether this one is still logged."""
        self._rejected_requests += 1
        count = self._rejected_requests
        if count > MAX_REJECTED_REQUESTS:
            self.closing_reason = f"{count} rejected requests"
        if count == LOGGED_REJECTIONS + 1:
            log.info("rejected more requests from %s; only their count is logged", self.peer)
        return count <= LOGGED_REJECTIONS

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or self.principal is None:
            self._reject("%r channel", kind)
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if not self.admit():
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        with self._lock:
            self._forget_closed_channels()
            crowded = len(self._open_channels) >= self.limits.max_channels_per_connection
            if not crowded:
                self._open_channels.add(chanid)
        if crowded:
            self._reject(
                "session channel (%d are open, max_channels_per_connection)",
                self.limits.max_channels_per_connection,
            )
            return OPEN_FAILED_RESOURCE_SHORTAGE
        self.touch()
        return OPEN_SUCCEEDED

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
        # Only names are logged: a value may be a secret that a client's SendEnv leaks.
        name_text = name.decode("ascii", errors="replace")
        chanid = channel.get_id()
        with self._lock:
            executed = chanid in self._exec_channels
            count = self._env_requests.get(chanid, 0) + 1
            self._env_requests[chanid] = count
        if executed:
            return self._reject("environment variable %r after exec", name_text)
        if count > MAX_ENV_REQUESTS_PER_CHANNEL:
            return self._reject(
                "environment variable %r (over %d on one channel)",
                name_text,
                MAX_ENV_REQUESTS_PER_CHANNEL,
            )
        text = value.decode("ascii", errors="replace")
        if (
            name == b"GIT_PROTOCOL"
            and len(value) <= MAX_GIT_PROTOCOL_LENGTH
            and GIT_PROTOCOL_PATTERN.fullmatch(text)
        ):
            with self._lock:
                self._git_protocols[chanid] = text
            return True
        return self._reject("environment variable %r", name_text)

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        principal = self.principal
        chanid = channel.get_id()
        if principal is None:
            return self._reject("exec before authentication")
        with self._lock:
            repeated = chanid in self._exec_channels
            self._exec_channels.add(chanid)
        if repeated:
            return self._reject("second exec on channel %d", chanid)

        try:
            service = parse_git_command(command, self.server.repo_name)
        except CommandRejected as error:
            if self._count_rejection():
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
                self.limits.max_sessions_per_key,
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
        self._start_session(channel, principal, service)
        return True

    def _start_session(
        self, channel: paramiko.Channel, principal: Principal, service: GitService
    ) -> None:
        chanid = channel.get_id()
        handoff = self.server.handoff_path() if service is GitService.RECEIVE_PACK else None
        with self._lock:
            git_protocol = self._git_protocols.pop(chanid, None)
        environment = self.server.child_environment(principal, git_protocol, self.peer, handoff)

        def exited(session: GitSession, status: int) -> None:
            self.server.command_exited(principal, handoff, session, status)

        def ended(session: GitSession) -> None:
            if handoff is not None:
                handoff.unlink(missing_ok=True)
            self.server.release_session(principal.fingerprint)
            self.session_ended(chanid)

        session = GitSession(
            channel,
            service,
            self.server.git_argv(service, principal.role),
            environment,
            self.server.repository,
            peer=self.peer,
            idle_timeout=self.limits.idle_timeout,
            deadline=self.deadline,
            stopping=self.server.stop_event,
            on_exit=exited,
            on_end=ended,
        )
        with self._lock:
            self._sessions[chanid] = session
        session.start()

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
            self._closers = [timer for timer in self._closers if timer.is_alive()]
            self._closers.append(closer)
        closer.start()

    # --- bookkeeping ------------------------------------------------------------------------

    def keep(self, channel: paramiko.Channel | None) -> None:
        """Hold ``channel`` while it is open, and drop the channels that have closed."""
        with self._lock:
            self._forget_closed_channels()
            if channel is not None:
                self._channels.append(channel)

    def _forget_closed_channels(self) -> None:
        """Drop closed channels and what was kept about them. Call with the lock held."""
        still_open = []
        for channel in self._channels:
            if not channel.closed:
                still_open.append(channel)
                continue
            chanid = channel.get_id()
            self._open_channels.discard(chanid)
            self._exec_channels.discard(chanid)
            self._env_requests.pop(chanid, None)
            self._git_protocols.pop(chanid, None)
        self._channels = still_open

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
            admitted = self._admitted
        for closer in closers:
            closer.cancel()
        for session in sessions:
            session.join()
        if admitted and self.principal is not None:
            self.server.release_connection(self.principal.fingerprint)
        if self._rejected_requests > LOGGED_REJECTIONS:
            log.info(
                "connection from %s had %d rejected requests in all",
                self.peer,
                self._rejected_requests,
            )
