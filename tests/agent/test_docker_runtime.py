"""The Docker runtime against the real engine, with a local busybox image; nothing is pulled.

Every container runs with network mode none or host. Images that a test tags name a
registry on loopback port 9, where nothing listens, so a pull that should not happen
fails at once without leaving the machine.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tinkops_agent.docker_runtime import (
    PRIVILEGED_FALLBACK_NOTE,
    DockerRuntime,
    PullPolicy,
    credentials_for,
    missing_capabilities,
    normalize_registry,
    registry_of,
)
from tinkops_agent.protocol import Action, State, Task
from tinkops_agent.runtime import (
    LABEL_MANAGED,
    LABEL_WORKFLOW,
    ContainerRuntimeError,
    ContainerSpec,
    RunResult,
    build_spec,
)

docker_test = pytest.mark.docker

LOOPBACK_REGISTRY = "127.0.0.1:9"
CAP_SYS_ADMIN_BIT = 21


@pytest.fixture(scope="module")
def runtime(docker_client: Any) -> Iterator[DockerRuntime]:
    """One runtime for most tests, so a privilege fallback is found once per module."""
    yield DockerRuntime(docker_client, pull=PullPolicy.NEVER, network_mode="none")


@pytest.fixture
def loopback_tag(docker_client: Any, busybox_image: str) -> Iterator[str]:
    """The busybox image tagged under the loopback registry; the tag goes away afterwards."""
    repository = f"{LOOPBACK_REGISTRY}/tinkops-test/busybox"
    tag = uuid.uuid4().hex[:12]
    docker_client.images.get(busybox_image).tag(repository, tag)
    yield f"{repository}:{tag}"
    docker_client.images.remove(f"{repository}:{tag}")


def make_spec(
    tmp_path: Path,
    image: str,
    command: tuple[str, ...] | None,
    *,
    name: str = "test action",
    timeout: int = 0,
    task_environment: dict[str, str] | None = None,
    environment: dict[str, str] | None = None,
    task_volumes: tuple[str, ...] = (),
    volumes: tuple[str, ...] = (),
    pid: str | None = None,
) -> ContainerSpec:
    action = Action(
        name=name,
        image=image,
        timeout=timeout,
        command=command,
        volumes=volumes,
        environment=environment or {},
        pid=pid,
    )
    task = Task(
        name="task",
        worker="08:00:27:00:00:01",
        actions=(action,),
        volumes=task_volumes,
        environment=task_environment or {},
    )
    workflow_dir = tmp_path / "workflow"
    workflow_dir.mkdir(exist_ok=True)
    workflow_id = "test-" + uuid.uuid4().hex[:8]
    return build_spec(workflow_id, 0, task, action, workflow_dir, default_timeout=60)


def shell(script: str) -> tuple[str, ...]:
    return ("sh", "-c", script)


def assert_container_gone(docker_client: Any, spec: ContainerSpec) -> None:
    leftovers = docker_client.containers.list(all=True, filters={"name": f"^{spec.name}$"})
    assert leftovers == []


def run(runtime: DockerRuntime, spec: ContainerSpec, tmp_path: Path) -> RunResult:
    return runtime.run(spec, tmp_path / "logs" / "action.log")


# --- Outcomes -------------------------------------------------------------------------------


@docker_test
def test_exit_zero_succeeds(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, shell("echo hello from the action"))

    result = run(runtime, spec, tmp_path)

    assert result.state is State.SUCCESS
    assert result.exit_code == 0
    assert result.log_tail == "hello from the action"
    assert result.log_path.read_text() == "hello from the action\n"
    assert_container_gone(docker_client, spec)


@docker_test
def test_nonzero_exit_fails(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, shell("echo broken >&2; exit 3"))

    result = run(runtime, spec, tmp_path)

    assert result.state is State.FAILED
    assert result.exit_code == 3
    assert "exited with code 3" in result.message
    assert result.log_tail == "broken"
    assert_container_gone(docker_client, spec)


@docker_test
def test_timeout_kills_container(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, shell("echo started; sleep 30"), timeout=1)

    result = run(runtime, spec, tmp_path)

    assert result.state is State.TIMEOUT
    assert result.seconds < 10
    assert result.message == "timed out after 1 s; the container was killed"
    assert result.log_tail == "started"
    assert_container_gone(docker_client, spec)


@docker_test
def test_cancel_kills_container(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, ("sleep", "30"))
    cancel = threading.Event()
    timer = threading.Timer(1.0, cancel.set)
    timer.start()

    result = runtime.run(spec, tmp_path / "action.log", cancel)

    timer.cancel()
    assert result.state is State.CANCELLED
    assert result.seconds < 10
    assert_container_gone(docker_client, spec)


@docker_test
def test_cancel_before_start(runtime: DockerRuntime, busybox_image: str, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, busybox_image, ("true",))
    cancel = threading.Event()
    cancel.set()

    result = runtime.run(spec, tmp_path / "action.log", cancel)

    assert result.state is State.CANCELLED
    assert result.exit_code is None


@docker_test
def test_missing_executable_fails(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, ("/bin/no-such-tool", "--flag"))

    result = run(runtime, spec, tmp_path)

    assert result.state is State.FAILED
    assert result.exit_code is None
    assert "did not start" in result.message
    assert "no-such-tool" in result.message
    assert_container_gone(docker_client, spec)


# --- Tinkerbell's container contract --------------------------------------------------------


@docker_test
def test_environment_reaches_container_as_text(
    runtime: DockerRuntime, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(
        tmp_path,
        busybox_image,
        ("env",),
        task_environment={"SHARED": "task", "TASK_ONLY": "from task"},
        environment={"SHARED": "action", "MODE": "0600", "COMPRESSED": "true"},
    )

    result = run(runtime, spec, tmp_path)

    variables = result.log_path.read_text().splitlines()
    assert result.state is State.SUCCESS
    assert "MODE=0600" in variables
    assert "COMPRESSED=true" in variables
    assert "SHARED=action" in variables
    assert "TASK_ONLY=from task" in variables


@docker_test
def test_volumes_merge_and_workflow_bind(
    runtime: DockerRuntime, busybox_image: str, tmp_path: Path
) -> None:
    task_data = tmp_path / "task-data"
    action_data = tmp_path / "action-data"
    read_only = tmp_path / "read-only"
    for folder, marker in ((task_data, "task"), (action_data, "action"), (read_only, "ro")):
        folder.mkdir()
        (folder / "marker").write_text(marker)
    script = (
        "cat /data/marker; echo; cat /extra/marker; echo; "
        "echo written-inside > /workflow/x; "
        "if touch /extra/new 2>/dev/null; then echo extra-writable; fi"
    )
    spec = make_spec(
        tmp_path,
        busybox_image,
        shell(script),
        task_volumes=(f"{task_data}:/data",),
        volumes=(f"{action_data}:/data", f"{read_only}:/extra:ro"),
    )

    result = run(runtime, spec, tmp_path)

    assert result.state is State.SUCCESS
    assert result.log_tail.splitlines() == ["action", "ro"]
    assert (spec.workflow_dir / "x").read_text() == "written-inside\n"
    assert not (read_only / "new").exists()


@docker_test
def test_command_is_cmd_not_entrypoint(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    base = docker_client.containers.create(busybox_image, ["true"], network_mode="none")
    repository = "tinkops-test/entrypoint"
    tag = uuid.uuid4().hex[:12]
    try:
        base.commit(repository, tag, changes=['ENTRYPOINT ["/bin/echo", "entrypoint:"]'])
    finally:
        base.remove(force=True)
    try:
        spec = make_spec(tmp_path, f"{repository}:{tag}", ("first", "second argument"))
        result = run(runtime, spec, tmp_path)
    finally:
        docker_client.images.remove(f"{repository}:{tag}")

    assert result.state is State.SUCCESS
    assert result.log_tail == "entrypoint: first second argument"


@docker_test
@pytest.mark.parametrize(
    "name", ["stream ubuntu image", "écrire/le disque 💾", "../../etc/passwd", "日本語"]
)
def test_awkward_action_names_run(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path, name: str
) -> None:
    spec = make_spec(tmp_path, busybox_image, ("true",), name=name)

    result = run(runtime, spec, tmp_path)

    assert result.state is State.SUCCESS
    assert_container_gone(docker_client, spec)


@docker_test
def test_pid_host_joins_host_namespace(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    runtime = DockerRuntime(docker_client, pull=PullPolicy.NEVER, network_mode="host")
    own = make_spec(tmp_path, busybox_image, shell("echo $$"))
    host = make_spec(tmp_path, busybox_image, shell("echo $$"), pid="host")

    own_result = run(runtime, own, tmp_path)
    host_result = run(runtime, host, tmp_path)

    assert own_result.log_tail == "1"
    assert host_result.state is State.SUCCESS
    assert host_result.log_tail != "1"


@docker_test
def test_privileged_or_reported_fallback(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    runtime = DockerRuntime(docker_client, pull=PullPolicy.NEVER, network_mode="none")
    spec = make_spec(tmp_path, busybox_image, shell("grep CapEff /proc/self/status"))

    first = run(runtime, spec, tmp_path)
    second = run(runtime, spec, tmp_path)

    effective = int(first.log_tail.split()[-1], 16)
    assert first.state is State.SUCCESS
    assert effective & (1 << CAP_SYS_ADMIN_BIT)
    if PRIVILEGED_FALLBACK_NOTE in first.notes:
        assert PRIVILEGED_FALLBACK_NOTE in second.notes
        assert "every capability" in runtime.describe()
    else:
        assert first.notes == ()
        assert "containers privileged" in runtime.describe()


@docker_test
def test_unprivileged_when_configured(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    runtime = DockerRuntime(
        docker_client, pull=PullPolicy.NEVER, network_mode="none", privileged=False
    )
    spec = make_spec(tmp_path, busybox_image, shell("grep CapEff /proc/self/status"))

    result = run(runtime, spec, tmp_path)

    effective = int(result.log_tail.split()[-1], 16)
    assert result.state is State.SUCCESS
    assert result.notes == ()
    assert not effective & (1 << CAP_SYS_ADMIN_BIT)


@pytest.mark.parametrize("mode", ["bridge", "default", "container:other", ""])
def test_network_mode_rejected(mode: str) -> None:
    with pytest.raises(ValueError, match="network mode"):
        DockerRuntime(object(), network_mode=mode)


# --- Output ---------------------------------------------------------------------------------


@docker_test
def test_output_streamed_and_tail_bounded(
    runtime: DockerRuntime, busybox_image: str, tmp_path: Path
) -> None:
    script = "echo first; sleep 2; seq 1 500; echo $(seq 1 3000)"
    spec = make_spec(tmp_path, busybox_image, shell(script))
    log_path = tmp_path / "action.log"
    results: list[RunResult] = []
    worker = threading.Thread(target=lambda: results.append(runtime.run(spec, log_path)))

    worker.start()
    seen_while_running = False
    while worker.is_alive() and not seen_while_running:
        seen_while_running = log_path.exists() and "first" in log_path.read_text()
        time.sleep(0.05)
    worker.join()

    result = results[0]
    lines = log_path.read_text().splitlines()
    assert seen_while_running
    assert result.state is State.SUCCESS
    assert len(lines) == 502
    assert len(result.log_tail.encode()) <= 8192
    assert len(result.log_tail.splitlines()) <= 50
    assert result.log_tail.endswith("2999 3000")


# --- Images and registries ------------------------------------------------------------------


@docker_test
def test_pull_never_missing_image_fails(runtime: DockerRuntime, tmp_path: Path) -> None:
    image = f"{LOOPBACK_REGISTRY}/tinkops-test/absent:{uuid.uuid4().hex[:8]}"
    spec = make_spec(tmp_path, image, ("true",))

    started = time.monotonic()
    result = run(runtime, spec, tmp_path)

    assert result.state is State.FAILED
    assert result.exit_code is None
    assert result.message == (f"image {image} is not present locally and the pull policy is never")
    assert time.monotonic() - started < 5


@docker_test
def test_pull_missing_uses_local_image(
    docker_client: Any, loopback_tag: str, tmp_path: Path
) -> None:
    runtime = DockerRuntime(docker_client, pull=PullPolicy.MISSING, network_mode="none")
    spec = make_spec(tmp_path, loopback_tag, ("true",))

    result = run(runtime, spec, tmp_path)

    assert result.state is State.SUCCESS
    assert set(result.notes) <= {PRIVILEGED_FALLBACK_NOTE}


@docker_test
def test_pull_always_failure_uses_local_copy(
    docker_client: Any, loopback_tag: str, tmp_path: Path
) -> None:
    runtime = DockerRuntime(docker_client, pull=PullPolicy.ALWAYS, network_mode="none")
    spec = make_spec(tmp_path, loopback_tag, ("true",))

    result = run(runtime, spec, tmp_path)

    assert result.state is State.SUCCESS
    assert any(f"pulling image {loopback_tag} failed" in note for note in result.notes)
    assert any("used the local copy" in note for note in result.notes)


@docker_test
def test_pull_always_without_local_copy_fails(docker_client: Any, tmp_path: Path) -> None:
    runtime = DockerRuntime(docker_client, pull=PullPolicy.ALWAYS, network_mode="none")
    image = f"{LOOPBACK_REGISTRY}/tinkops-test/absent:{uuid.uuid4().hex[:8]}"
    spec = make_spec(tmp_path, image, ("true",))

    result = run(runtime, spec, tmp_path)

    assert result.state is State.FAILED
    assert result.message.startswith(f"pulling image {image} failed")


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("busybox", "docker.io"),
        ("busybox:1.36", "docker.io"),
        ("library/busybox", "docker.io"),
        ("tinkerbell/actions", "docker.io"),
        ("docker.io/library/busybox", "docker.io"),
        ("index.docker.io/library/busybox", "docker.io"),
        ("quay.io/tinkerbell/actions/image2disk:v1.0.0", "quay.io"),
        ("localhost/image", "localhost"),
        ("localhost:5000/image:tag", "localhost:5000"),
        ("registry:5000/image", "registry:5000"),
        ("10.0.0.1/team/image@sha256:" + "a" * 64, "10.0.0.1"),
        ("[::1]:5000/image", "[::1]:5000"),
        ("Registry/image", "registry"),
        ("ghcr.io/org/image", "ghcr.io"),
    ],
)
def test_registry_of_reference(image: str, registry: str) -> None:
    assert registry_of(image) == registry


def test_credentials_only_for_own_registry() -> None:
    registry_auth = {
        "https://quay.io/v1/": ("quay-user", "quay-secret"),
        "index.docker.io": ("hub-user", "hub-secret"),
        "localhost:5000": ("local-user", "local-secret"),
    }

    assert credentials_for("quay.io/tinkerbell/image2disk", registry_auth) == (
        "quay-user",
        "quay-secret",
    )
    assert credentials_for("tinkerbell/image2disk", registry_auth) == ("hub-user", "hub-secret")
    assert credentials_for("localhost:5000/x", registry_auth) == ("local-user", "local-secret")
    assert credentials_for("localhost:5001/x", registry_auth) is None
    assert credentials_for("ghcr.io/quay.io/x", registry_auth) is None
    assert credentials_for("evil.example/quay.io", registry_auth) is None


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("Quay.IO", "quay.io"),
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("http://localhost:5000/", "localhost:5000"),
    ],
)
def test_normalize_registry_key(key: str, host: str) -> None:
    assert normalize_registry(key) == host


def test_missing_capabilities_from_status() -> None:
    status = "Name:\tagent\nCapBnd:\t000001fffeffffff\nCapAmb:\t0000000000000000\n"

    assert missing_capabilities(status) == ("SYS_RESOURCE",)
    assert missing_capabilities("CapBnd:\t000001ffffffffff\n") == ()
    assert missing_capabilities("no such line") == ()


# --- Leftovers and errors -------------------------------------------------------------------


@docker_test
def test_cleanup_removes_labelled_leftover(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str
) -> None:
    workflow = "cleanup-" + uuid.uuid4().hex[:8]
    leftover = docker_client.containers.create(
        busybox_image,
        ["sleep", "30"],
        network_mode="none",
        labels={LABEL_MANAGED: "true", LABEL_WORKFLOW: workflow},
    )
    foreign = docker_client.containers.create(
        busybox_image, ["true"], network_mode="none", labels={LABEL_WORKFLOW: workflow}
    )
    try:
        removed = runtime.cleanup({LABEL_WORKFLOW: workflow})
        remaining = {
            container.id
            for container in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_WORKFLOW}={workflow}"}
            )
        }
    finally:
        foreign.remove(force=True)
        if leftover.id in remaining:
            leftover.remove(force=True)

    assert removed == 1
    assert remaining == {foreign.id}


@docker_test
def test_leftover_with_same_name_replaced(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, shell("echo second run"))
    docker_client.containers.create(
        busybox_image, ["true"], name=spec.name, network_mode="none", labels=dict(spec.labels)
    )

    result = run(runtime, spec, tmp_path)

    assert result.state is State.SUCCESS
    assert result.log_tail == "second run"
    assert_container_gone(docker_client, spec)


@docker_test
def test_name_taken_by_other_container(
    runtime: DockerRuntime, docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path, busybox_image, ("true",))
    other = docker_client.containers.create(
        busybox_image, ["true"], name=spec.name, network_mode="none"
    )
    try:
        result = run(runtime, spec, tmp_path)
        still_there = docker_client.containers.get(spec.name).id
    finally:
        other.remove(force=True)

    assert result.state is State.FAILED
    assert "is taken by a container that is not a leftover" in result.message
    assert still_there == other.id


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_unreachable_engine_raises(tmp_path: Path) -> None:
    with pytest.raises(ContainerRuntimeError, match="connecting to the Docker engine"):
        DockerRuntime(base_url=f"unix://{tmp_path}/absent.sock")

    # The Docker SDK leaves the socket of its failed version request to the garbage
    # collector; collect it here, where its ResourceWarning is ignored.
    gc.collect()
