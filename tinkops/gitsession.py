"""One git command over an SSH channel: parsing the exec request, and relaying the child.

``parse_git_command`` accepts only fetch and push of the served repository. ``GitSession`` runs
the stock ``git`` for it, copies the channel to the child's stdin, and copies the child's
stdout and stderr back to the channel. It stops when the child exits, the client goes idle, the
connection's time is up or the server stops. For a push, it also records the ref updates the
client requested and the end of receive-pack's output, so a push that fails before the hook
can be audited.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import paramiko

from tinkops.errors import TinkopsError

log = logging.getLogger(__name__)

MAX_COMMAND_LENGTH = 1024
# Everything a git client puts in its exec command: the command name, and a path that git
# wraps in single quotes. Any other character (shell syntax, control characters, anything
# outside ASCII) is rejected.
_COMMAND_CHARACTERS = re.compile(r"[A-Za-z0-9 ._/~'\"-]*")

_READ_SIZE = 64 * 1024
_POLL_SECONDS = 0.2
# Seconds the child gets to exit after SIGTERM before SIGKILL, and the output pumps get to
# finish after the child exited.
_TERMINATE_GRACE = 5.0
_DRAIN_GRACE = 5.0
# Bytes of receive-pack's output kept to explain a push that failed before the hook ran.
_OUTPUT_TAIL = 8 * 1024
# git's messages as they appear in that output, for example "fatal: pack exceeds maximum
# allowed size". Sideband framing and line ends stop a match.
_GIT_FAILURE = re.compile(rb"(?:fatal|error): [ -~]{1,300}")


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


class RefCommandReader:
    """The ref update commands at the start of a push, read from the client's stream.

    A push starts with pkt-lines ``<old> <new> <ref>`` (the first one followed by NUL and the
    client's capabilities), ended by a flush packet, before the pack. Reading stops at the
    flush, at anything unexpected, or after ``max_bytes``, so a malformed stream costs nothing.
    """

    def __init__(self, max_bytes: int = 256 * 1024) -> None:
        self.updates: list[tuple[str, str, str]] = []
        self.complete = False
        self._buffer = bytearray()
        self._consumed = 0
        self._max_bytes = max_bytes
        self._done = False

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        room = max(0, self._max_bytes - self._consumed - len(self._buffer))
        self._buffer += data[:room]
        while not self._done and len(self._buffer) >= 4:
            try:
                length = int(self._buffer[:4], 16)
            except ValueError:
                self._done = True
                break
            if length == 0:
                self.complete = self._done = True
                break
            if length < 4:
                self._done = True
                break
            if len(self._buffer) < length:
                break
            self._read_line(bytes(self._buffer[4:length]))
            del self._buffer[:length]
            self._consumed += length
        if self._consumed + len(self._buffer) >= self._max_bytes:
            self._done = True

    def _read_line(self, payload: bytes) -> None:
        line = payload.split(b"\0", 1)[0].rstrip(b"\n")
        if line.startswith(b"shallow "):
            return
        fields = line.decode("utf-8", errors="replace").split(" ")
        if len(fields) == 3:
            self.updates.append((fields[0], fields[1], fields[2]))
        else:
            # A push certificate or something else this reader does not follow.
            self._done = True


class GitSession:
    """One git command: the child process and the threads that relay its streams.

    ``on_exit`` runs with the exit status after it has been sent to the client and before the
    channel closes. ``on_end`` runs last, whatever happened.
    """

    def __init__(
        self,
        channel: paramiko.Channel,
        service: GitService,
        argv: Sequence[str],
        environment: Mapping[str, str],
        cwd: Path,
        *,
        peer: str,
        idle_timeout: float,
        deadline: float,
        stopping: threading.Event,
        on_exit: Callable[[GitSession, int], None],
        on_end: Callable[[GitSession], None],
    ) -> None:
        self.channel = channel
        self.service = service
        self.argv = list(argv)
        self.environment = dict(environment)
        self.cwd = cwd
        self.peer = peer
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.stopping = stopping
        self.on_exit = on_exit
        self.on_end = on_end
        self.commands = RefCommandReader()
        self._output_tail = bytearray()
        self._tail_lock = threading.Lock()
        self._last_activity = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"tinkops-git-{peer}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def failure_message(self) -> str:
        """Return git's first ``fatal:`` or ``error:`` message in the child's output, if any."""
        with self._tail_lock:
            match = _GIT_FAILURE.search(bytes(self._output_tail))
        return match.group().decode("ascii").strip() if match else ""

    def _run(self) -> None:
        try:
            self._relay()
        except Exception:
            log.exception("git %s for %s failed", self.service.value, self.peer)
        finally:
            self.channel.close()
            try:
                self.on_end(self)
            except Exception:
                log.exception("cleaning up git %s for %s failed", self.service.value, self.peer)

    def _relay(self) -> None:
        try:
            process = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.environment,
                cwd=self.cwd,
                bufsize=0,
                start_new_session=True,
            )
        except OSError as error:
            log.error("starting %s failed: %s", self.argv, error)
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
        log.info("git %s for %s exited with %d", self.service.value, self.peer, exit_status)
        try:
            self.channel.send_exit_status(exit_status)
        except OSError as error:
            log.info("could not send the exit status to %s: %s", self.peer, error)
        try:
            self.on_exit(self, exit_status)
        except Exception:
            log.exception("handling the end of git %s for %s failed", self.service.value, self.peer)

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
            log.exception("relaying git %s for %s failed", self.service.value, self.peer)

    def _pump_input(self, stdin: IO[bytes]) -> None:
        """Copy the channel to the child's stdin, and close stdin at the client's EOF."""
        watch_commands = self.service is GitService.RECEIVE_PACK
        try:
            while data := self.channel.recv(_READ_SIZE):
                self._last_activity = time.monotonic()
                if watch_commands:
                    self.commands.feed(data)
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
        keep_tail = self.service is GitService.RECEIVE_PACK
        while data := stream.read(_READ_SIZE):
            self._last_activity = time.monotonic()
            if keep_tail:
                self._remember_output(data)
            if not connected:
                continue
            try:
                send(data)
            except OSError as error:
                log.info(
                    "client %s went away during git %s: %s",
                    self.peer,
                    self.service.value,
                    error,
                )
                connected = False

    def _remember_output(self, data: bytes) -> None:
        with self._tail_lock:
            self._output_tail += data
            del self._output_tail[:-_OUTPUT_TAIL]

    def _wait(self, process: subprocess.Popen[bytes]) -> int:
        """Wait for the child, and end it when the server stops, the session stays idle or the
        connection's time is up."""
        while True:
            try:
                return process.wait(timeout=_POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            if self.stopping.is_set():
                reason = "the server stops"
            elif time.monotonic() > self.deadline:
                reason = "the connection reached its maximum time"
            elif time.monotonic() - self._last_activity > self.idle_timeout:
                reason = f"idle for more than {self.idle_timeout:.0f} s"
            else:
                continue
            log.info("ending git %s for %s: %s", self.service.value, self.peer, reason)
            return terminate(process)


def terminate(process: subprocess.Popen[bytes]) -> int:
    """End the child and its hooks (its process group): SIGTERM, then SIGKILL after a grace."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(timeout=_TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()
    except ProcessLookupError:
        return process.wait()
