"""The Docker runtime: each action runs as a container with Tinkerbell's contract.

The container is privileged, gets the merged environment and binds, takes the action's
``command`` as its Cmd (the image's entrypoint stays), joins the host's PID namespace when
the action requests ``pid: host``, and uses the host's network or none. Its output is
streamed to a log file on the worker, and the container is removed once it has ended.

Docker SDK errors are translated here: a failure the action caused becomes a FAILED
``RunResult`` and a failure of the engine becomes ``ContainerRuntimeError``.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from tinkops_agent.protocol import State
from tinkops_agent.runtime import (
    LABEL_ACTION,
    LABEL_ACTION_INDEX,
    LABEL_MANAGED,
    LABEL_WORKFLOW,
    ContainerRuntimeError,
    ContainerSpec,
    RunResult,
    read_log_tail,
)

logger = logging.getLogger(__name__)

NETWORK_MODES = ("host", "none")

PRIVILEGED_FALLBACK_NOTE = (
    "privileged mode is unavailable on this engine; "
    "ran with every capability the engine grants instead"
)

DOCKER_HUB = "docker.io"
# Names under which Docker Hub appears in credentials and image references.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# runc's error when the engine requests a capability that its own bounding set lacks, as
# happens for privileged containers when the engine itself runs with reduced capabilities.
_CAPS_FAILURE = "unable to apply caps: operation not permitted"
_UNKNOWN_CAPABILITY = re.compile(r'unknown capability: "?(?:CAP_)?([A-Z_]+)"?')
_UNCONFINED = ("apparmor=unconfined", "seccomp=unconfined")

# Linux capability names by bit number, from CAP_CHOWN (0) to CAP_CHECKPOINT_RESTORE (40).
_CAPABILITY_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip

_POLL_SECONDS = 0.1
# How long to wait for the exit status and the end of the output after a container stopped.
_DRAIN_SECONDS = 10.0


class PullPolicy(enum.Enum):
    """When the runtime pulls an action's image."""

    ALWAYS = "always"
    """Pull before every run. If the pull fails, a local copy is used and a note records it."""
    MISSING = "missing"
    """Pull only when the image is not present locally."""
    NEVER = "never"
    """Never pull; an image that is not present locally fails the action."""


class _StartFailure(Exception):
    """The action could not start for a reason of its own, which the message gives."""


@dataclass(frozen=True)
class _Privileges:
    """The privilege-related host configuration of an action container."""

    privileged: bool
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    fallback: bool = False
    """True when this replaces privileged mode, which the engine cannot provide."""

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"privileged": self.privileged}
        if self.cap_add:
            options["cap_add"] = list(self.cap_add)
        if self.cap_drop:
            options["cap_drop"] = list(self.cap_drop)
        if self.security_opt:
            options["security_opt"] = list(self.security_opt)
        return options


_PRIVILEGED = _Privileges(privileged=True)
_UNPRIVILEGED = _Privileges(privileged=False)


@dataclass(frozen=True)
class _Outcome:
    state: State
    exit_code: int | None
    message: str


# --- Registries and credentials -------------------------------------------------------------


def normalize_registry(name: str) -> str:
    """Return the registry host of a credentials key such as ``https://quay.io/v1/``.

    Hosts are compared in lower case, and every Docker Hub alias becomes ``docker.io``.
    """
    host = name.strip().lower()
    for scheme in ("https://", "http://"):
        host = host.removeprefix(scheme)
    host = host.split("/", 1)[0]
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def registry_of(image: str) -> str:
    """Return the registry host that an image reference names, the way Docker reads it.

    The first path component is a registry only when it contains '.' or ':', is
    'localhost', or has upper-case letters (which repository names cannot have), following
    splitDockerDomain in github.com/distribution/reference. Otherwise the image is on
    Docker Hub.
    """
    first, separator, _ = image.partition("/")
    if not separator:
        return DOCKER_HUB
    if first == "localhost" or "." in first or ":" in first or first.lower() != first:
        return normalize_registry(first)
    return DOCKER_HUB


def credentials_for(
    image: str, registry_auth: Mapping[str, tuple[str, str]]
) -> tuple[str, str] | None:
    """Return the (username, password) configured for the registry of ``image``, if any."""
    registry = registry_of(image)
    for key, credentials in registry_auth.items():
        if normalize_registry(key) == registry:
            return credentials
    return None


# --- Capabilities ---------------------------------------------------------------------------


def missing_capabilities(proc_status: str) -> tuple[str, ...]:
    """Return the names of capabilities absent from the ``CapBnd`` line of /proc/PID/status."""
    for line in proc_status.splitlines():
        key, _, value = line.partition(":")
        if key == "CapBnd":
            bounding = int(value.strip(), 16)
            return tuple(
                name for bit, name in enumerate(_CAPABILITY_NAMES) if not bounding & (1 << bit)
            )
    return ()


def _own_missing_capabilities() -> tuple[str, ...]:
    # NOTE: this reads the agent's own bounding set, which matches the engine's only when
    # both run on the same host with the same limits, as on a worker. For a remote engine
    # the last fallback attempt may drop too much or too little.
    try:
        return missing_capabilities(Path("/proc/self/status").read_text())
    except (OSError, ValueError):
        return ()


def _is_caps_failure(error: APIError) -> bool:
    return _CAPS_FAILURE in _explain(error)


def _explain(error: APIError) -> str:
    return str(error.explanation or error)


# --- The runtime ----------------------------------------------------------------------------


class DockerRuntime:
    """Runs actions as containers on one Docker engine.

    ``client`` is a ``docker.DockerClient``. Without one, the runtime connects to
    ``base_url`` or, when that is None too, to the engine that DOCKER_HOST or the default
    socket names. ``registry_auth`` maps a registry host to (username, password), and a
    pull sends credentials only to the registry its image names.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        base_url: str | None = None,
        pull: PullPolicy = PullPolicy.MISSING,
        network_mode: str = "host",
        registry_auth: Mapping[str, tuple[str, str]] | None = None,
        privileged: bool = True,
    ) -> None:
        if network_mode not in NETWORK_MODES:
            raise ValueError(
                f"network mode {network_mode!r} is not supported for actions "
                f"(expected one of {', '.join(NETWORK_MODES)})"
            )
        self._owns_client = client is None
        self._client = client if client is not None else _connect(base_url)
        self._pull = pull
        self._network_mode = network_mode
        self._registry_auth = dict(registry_auth or {})
        self._privileged = privileged
        self._lock = threading.Lock()
        # The privileges that started a container on this engine, once known.
        self._privileges: _Privileges | None = None if privileged else _UNPRIVILEGED

    def close(self) -> None:
        """Close the connection to the engine if this runtime opened it."""
        if self._owns_client:
            self._client.close()

    def describe(self) -> str:
        try:
            version = str(self._client.version().get("Version", "unknown"))
        except (DockerException, OSError) as error:
            version = f"unreachable ({error})"
        known = self._privileges
        if known is not None and known.fallback:
            mode = "unprivileged with every capability the engine grants"
        elif self._privileged:
            mode = "privileged"
        else:
            mode = "unprivileged (configured)"
        return (
            f"Docker engine {version} at {_engine_address(self._client)}: containers {mode}, "
            f"network {self._network_mode}, image pull policy {self._pull.value}"
        )

    def run(
        self, spec: ContainerSpec, log_path: Path, cancel: threading.Event | None = None
    ) -> RunResult:
        """Run ``spec`` as a container and remove the container afterwards.

        The whole output goes to ``log_path``. A timeout or ``cancel`` kills the container.
        Returns FAILED with no exit code when the container cannot start. Raises
        ContainerRuntimeError when the engine fails.
        """
        started = time.monotonic()
        notes: list[str] = []
        if cancel is not None and cancel.is_set():
            return RunResult(
                State.CANCELLED, None, 0.0, "cancelled before it started", "", log_path
            )
        try:
            notes += self._prepare_image(spec.image)
            container, privileges = self._create_and_start(spec)
        except _StartFailure as error:
            logger.warning("action container %s did not start: %s", spec.name, error)
            return RunResult(
                state=State.FAILED,
                exit_code=None,
                seconds=time.monotonic() - started,
                message=str(error),
                log_tail="",
                log_path=log_path,
                notes=tuple(notes),
            )

        if privileges.fallback:
            notes.append(PRIVILEGED_FALLBACK_NOTE)
        try:
            outcome = self._supervise(container, spec, log_path, cancel, notes)
        finally:
            self._remove_after_run(container, spec.name, notes)
        logger.info("action container %s ended: %s", spec.name, outcome.message)
        return RunResult(
            state=outcome.state,
            exit_code=outcome.exit_code,
            seconds=time.monotonic() - started,
            message=outcome.message,
            log_tail=read_log_tail(log_path),
            log_path=log_path,
            notes=tuple(notes),
        )

    def cleanup(self, labels: Mapping[str, str]) -> int:
        """Remove every tinkops container carrying all ``labels`` and return how many."""
        filters = [
            f"{LABEL_MANAGED}=true",
            *(f"{key}={value}" for key, value in labels.items()),
        ]
        try:
            containers = self._client.containers.list(all=True, filters={"label": filters})
        except (DockerException, OSError) as error:
            raise ContainerRuntimeError(f"listing leftover containers failed: {error}") from error

        removed = 0
        for container in containers:
            try:
                container.remove(force=True, v=True)
            except NotFound:
                continue
            except (DockerException, OSError) as error:
                raise ContainerRuntimeError(
                    f"removing leftover container {container.name} failed: {error}"
                ) from error
            logger.info("removed leftover action container %s", container.name)
            removed += 1
        return removed

    # --- Images ---------------------------------------------------------------------------

    def _prepare_image(self, image: str) -> list[str]:
        """Make ``image`` available according to the pull policy and return notes for the event."""
        present = self._image_present(image)
        if self._pull is PullPolicy.NEVER:
            if not present:
                raise _StartFailure(
                    f"image {image} is not present locally and the pull policy is never"
                )
            return []
        if present and self._pull is PullPolicy.MISSING:
            return []

        try:
            self._pull_image(image)
        except _StartFailure as error:
            if not present:
                raise
            logger.warning("%s; using the local copy of %s", error, image)
            return [f"{error}; used the local copy"]
        return []

    def _image_present(self, image: str) -> bool:
        try:
            self._client.images.get(image)
        except ImageNotFound:
            return False
        except APIError as error:
            raise _StartFailure(f"image {image} cannot be used: {_explain(error)}") from error
        except (DockerException, OSError) as error:
            raise ContainerRuntimeError(f"looking up image {image} failed: {error}") from error
        return True

    def _pull_image(self, image: str) -> None:
        credentials = credentials_for(image, self._registry_auth)
        options: dict[str, Any] = {}
        if credentials is not None:
            options["auth_config"] = {"username": credentials[0], "password": credentials[1]}
        logger.info(
            "pulling image %s from %s%s",
            image,
            registry_of(image),
            " with configured credentials" if credentials else "",
        )
        try:
            for message in self._client.api.pull(image, stream=True, decode=True, **options):
                if "error" in message:
                    raise _StartFailure(f"pulling image {image} failed: {message['error']}")
        except APIError as error:
            raise _StartFailure(f"pulling image {image} failed: {_explain(error)}") from error
        except (DockerException, OSError) as error:
            raise ContainerRuntimeError(f"pulling image {image} failed: {error}") from error

    # --- Starting -------------------------------------------------------------------------

    def _create_and_start(self, spec: ContainerSpec) -> tuple[Any, _Privileges]:
        """Start the container, falling back once from privileged mode if runc rejects it."""
        caps_error: APIError | None = None
        for candidate in self._privilege_candidates():
            container, privileges = self._create(spec, candidate)
            try:
                container.start()
            except APIError as error:
                self._remove_quietly(container)
                if _is_caps_failure(error) and (privileges.privileged or privileges.fallback):
                    caps_error = error
                    continue
                raise _StartFailure(
                    f"container {spec.name} did not start: {_explain(error)}"
                ) from error
            except (DockerException, OSError) as error:
                self._remove_quietly(container)
                raise ContainerRuntimeError(
                    f"starting container {spec.name} failed: {error}"
                ) from error
            self._remember(privileges, caps_error)
            return container, privileges

        raise _StartFailure(
            "privileged mode is unavailable on this engine and running with every "
            f"capability it grants failed too ({caps_error and _explain(caps_error)}); "
            "run actions unprivileged (DockerRuntime privileged=False) or use an engine "
            "that may start privileged containers"
        ) from caps_error

    def _privilege_candidates(self) -> Iterator[_Privileges]:
        with self._lock:
            known = self._privileges
        if known is not None:
            yield known
            return
        yield _PRIVILEGED
        every_capability = _Privileges(
            privileged=False, cap_add=("ALL",), security_opt=_UNCONFINED, fallback=True
        )
        yield every_capability
        missing = _own_missing_capabilities()
        if missing:
            yield replace(every_capability, cap_drop=missing)

    def _remember(self, privileges: _Privileges, caps_error: APIError | None) -> None:
        with self._lock:
            if self._privileges == privileges:
                return
            self._privileges = privileges
        if privileges.fallback:
            # NOTE: privileged mode also exposes every host device node; this fallback
            # does not, so actions that write to disks see no /dev entries for them.
            logger.warning(
                "privileged containers cannot start on this engine (%s); actions now run "
                "unprivileged with every capability the engine grants, dropping %s",
                caps_error and _explain(caps_error),
                ", ".join(privileges.cap_drop) or "none",
            )

    def _create(self, spec: ContainerSpec, privileges: _Privileges) -> tuple[Any, _Privileges]:
        """Create the container and return it with the privileges the engine accepted.

        A capability the engine does not know is removed from ``cap_drop``, because the
        engine cannot grant it either. A leftover tinkops container with the same name,
        from a run that crashed, is removed once.
        """
        removed_leftover = False
        while True:
            try:
                container = self._client.containers.create(**self._create_options(spec, privileges))
            except APIError as error:
                unknown = _UNKNOWN_CAPABILITY.search(_explain(error))
                if unknown and unknown.group(1) in privileges.cap_drop:
                    kept = tuple(name for name in privileges.cap_drop if name != unknown.group(1))
                    privileges = replace(privileges, cap_drop=kept)
                    continue
                if error.status_code == 409 and not removed_leftover:
                    self._remove_leftover(spec, error)
                    removed_leftover = True
                    continue
                raise _StartFailure(
                    f"container {spec.name} cannot be created: {_explain(error)}"
                ) from error
            except (DockerException, OSError) as error:
                raise ContainerRuntimeError(
                    f"creating container {spec.name} failed: {error}"
                ) from error
            return container, privileges

    def _create_options(self, spec: ContainerSpec, privileges: _Privileges) -> dict[str, Any]:
        options: dict[str, Any] = {
            "image": spec.image,
            "name": spec.name,
            "command": None if spec.command is None else list(spec.command),
            "environment": dict(spec.environment),
            "volumes": list(spec.volumes),
            "labels": dict(spec.labels),
            "network_mode": self._network_mode,
            "detach": True,
            **privileges.options(),
        }
        if spec.pid:
            options["pid_mode"] = spec.pid
        return options

    def _remove_leftover(self, spec: ContainerSpec, conflict: APIError) -> None:
        """Remove the container named ``spec.name`` if a crashed run of this action left it."""
        try:
            existing = self._client.containers.get(spec.name)
        except NotFound:
            return
        except (DockerException, OSError) as error:
            raise ContainerRuntimeError(
                f"inspecting container {spec.name} failed: {error}"
            ) from error
        labels = existing.labels or {}
        same_action = all(
            labels.get(key) == spec.labels.get(key)
            for key in (LABEL_MANAGED, LABEL_WORKFLOW, LABEL_ACTION_INDEX, LABEL_ACTION)
        )
        if not same_action:
            raise _StartFailure(
                f"container name {spec.name} is taken by a container that is not a leftover "
                f"of this action ({_explain(conflict)}); remove or rename that container"
            ) from conflict
        logger.warning("removing leftover container %s of an earlier run", spec.name)
        self._remove_quietly(existing)

    # --- Running --------------------------------------------------------------------------

    def _supervise(
        self,
        container: Any,
        spec: ContainerSpec,
        log_path: Path,
        cancel: threading.Event | None,
        notes: list[str],
    ) -> _Outcome:
        """Stream the output to ``log_path`` and wait for the end, the timeout or ``cancel``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log_file:
            pump = _LogPump(container, log_file)
            pump.start()
            waiter = _ExitWaiter(container)
            waiter.start()

            stopped_as = self._wait_or_kill(container, waiter, spec.timeout, cancel)
            if not waiter.done.wait(_DRAIN_SECONDS):
                raise ContainerRuntimeError(
                    f"the engine reported no exit of container {spec.name} within "
                    f"{_DRAIN_SECONDS:g} s of its end or its kill"
                )
            pump.join(_DRAIN_SECONDS)
            notes += pump.problems()

        if waiter.error is not None and stopped_as is None:
            raise ContainerRuntimeError(
                f"waiting for container {spec.name} failed: {waiter.error}"
            ) from waiter.error
        return _outcome(stopped_as, waiter.exit_code, waiter.engine_message, spec.timeout)

    def _wait_or_kill(
        self,
        container: Any,
        waiter: _ExitWaiter,
        timeout: float | None,
        cancel: threading.Event | None,
    ) -> State | None:
        """Wait for the container to exit, or kill it on timeout or cancel and return which."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not waiter.done.wait(_POLL_SECONDS):
            if cancel is not None and cancel.is_set():
                reason = State.CANCELLED
            elif deadline is not None and time.monotonic() >= deadline:
                reason = State.TIMEOUT
            else:
                continue
            logger.info("killing container %s: %s", container.name, reason.value)
            return reason if self._kill(container) else None
        return None

    def _kill(self, container: Any) -> bool:
        """Kill ``container`` and return True, or False when it had already stopped."""
        try:
            container.kill()
        except APIError as error:
            if isinstance(error, NotFound) or error.status_code == 409:
                return False
            raise ContainerRuntimeError(
                f"killing container {container.name} failed: {_explain(error)}"
            ) from error
        except (DockerException, OSError) as error:
            raise ContainerRuntimeError(
                f"killing container {container.name} failed: {error}"
            ) from error
        return True

    def _remove_after_run(self, container: Any, name: str, notes: list[str]) -> None:
        try:
            container.remove(force=True, v=True)
        except NotFound:
            return
        except (DockerException, OSError) as error:
            logger.warning("removing container %s failed: %s", name, error)
            notes.append(
                f"container {name} could not be removed ({error}); "
                "the agent's cleanup removes it later"
            )

    def _remove_quietly(self, container: Any) -> None:
        try:
            container.remove(force=True, v=True)
        except (DockerException, OSError) as error:
            logger.warning("removing container %s failed: %s", container.name, error)


def _connect(base_url: str | None) -> Any:
    try:
        if base_url is not None:
            return docker.DockerClient(base_url=base_url)
        return docker.from_env()
    except DockerException as error:
        where = base_url or "the default Docker socket"
        raise ContainerRuntimeError(
            f"connecting to the Docker engine at {where} failed: {error}"
        ) from error


def _engine_address(client: Any) -> str:
    # The SDK rewrites a unix socket address to http+docker://localhost and keeps the path
    # in its transport adapter, which is private, so fall back to the rewritten address.
    adapter = getattr(client.api, "_custom_adapter", None)
    socket_path = getattr(adapter, "socket_path", None)
    return f"unix://{socket_path}" if socket_path else str(client.api.base_url)


def _outcome(
    stopped_as: State | None, exit_code: int | None, engine_message: str, timeout: float | None
) -> _Outcome:
    if stopped_as is State.TIMEOUT:
        message = f"timed out after {timeout:g} s; the container was killed"
        return _Outcome(State.TIMEOUT, exit_code, message)
    if stopped_as is State.CANCELLED:
        return _Outcome(State.CANCELLED, exit_code, "cancelled; the container was killed")
    if exit_code == 0:
        return _Outcome(State.SUCCESS, 0, "exited with code 0")
    detail = f" ({engine_message})" if engine_message else ""
    return _Outcome(State.FAILED, exit_code, f"exited with code {exit_code}{detail}")


class _ExitWaiter(threading.Thread):
    """A thread blocked on the engine's wait call, which has no time limit."""

    def __init__(self, container: Any) -> None:
        super().__init__(name=f"wait-{container.name}", daemon=True)
        self._container = container
        self.done = threading.Event()
        self.exit_code: int | None = None
        self.engine_message = ""
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            status = self._container.wait(timeout=None)
            self.exit_code = int(status["StatusCode"])
            self.engine_message = str((status.get("Error") or {}).get("Message") or "")
        except (DockerException, OSError, KeyError, TypeError, ValueError) as error:
            self.error = error
        finally:
            self.done.set()


class _LogPump(threading.Thread):
    """A thread that copies the container's stdout and stderr into the log file as they arrive."""

    def __init__(self, container: Any, log_file: IO[bytes]) -> None:
        super().__init__(name=f"logs-{container.name}", daemon=True)
        self._container = container
        self._log_file = log_file
        self._error: Exception | None = None

    def run(self) -> None:
        try:
            stream = self._container.logs(stream=True, follow=True, stdout=True, stderr=True)
            for chunk in stream:
                self._log_file.write(chunk)
                self._log_file.flush()
        except (DockerException, OSError, ValueError) as error:
            # ValueError: the file was closed because the stream outlived the drain period.
            self._error = error

    def problems(self) -> list[str]:
        """Return notes for an output stream that failed or had not ended."""
        if self.is_alive():
            return [
                f"the output stream had not ended {_DRAIN_SECONDS:g} s after the "
                "container stopped; the log may be incomplete"
            ]
        if self._error is not None:
            return [f"reading the container's output failed: {self._error}"]
        return []
