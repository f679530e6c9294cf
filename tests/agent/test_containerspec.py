"""build_spec and the other pure helpers of the runtime seam: no engine, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinkops_agent.protocol import Action, Task
from tinkops_agent.runtime import (
    CONTAINER_NAME_MAX_LENGTH,
    CONTAINER_NAME_PATTERN,
    LABEL_ACTION,
    LABEL_ACTION_INDEX,
    LABEL_MANAGED,
    LABEL_TASK,
    LABEL_WORKER,
    LABEL_WORKFLOW,
    ActionSpecError,
    ContainerSpec,
    DuplicateVolumeTargetError,
    build_spec,
    read_log_tail,
    tail_lines,
)

WORKFLOW_DIR = Path("/var/lib/tinkops/workflows/wf-1")


def make_task(
    *actions: Action,
    volumes: tuple[str, ...] = (),
    environment: dict[str, str] | None = None,
) -> Task:
    return Task(
        name="os-installation",
        worker="08:00:27:00:00:01",
        actions=actions,
        volumes=volumes,
        environment=environment or {},
    )


def spec_for(
    action: Action,
    task: Task | None = None,
    *,
    workflow_id: str = "wf-1",
    index: int = 0,
    workflow_dir: Path = WORKFLOW_DIR,
    default_timeout: float | None = None,
) -> ContainerSpec:
    task = task or make_task(action)
    return build_spec(workflow_id, index, task, action, workflow_dir, default_timeout)


# --- Environment ----------------------------------------------------------------------------


def test_environment_action_wins() -> None:
    action = Action(name="a", image="img", environment={"SHARED": "action", "OWN": "1"})
    task = make_task(action, environment={"SHARED": "task", "TASK_ONLY": "t"})

    environment = spec_for(action, task).environment

    assert environment["SHARED"] == "action"
    assert environment["TASK_ONLY"] == "t"
    assert environment["OWN"] == "1"


def test_environment_values_kept_as_text() -> None:
    action = Action(
        name="a",
        image="img",
        environment={"MODE": "0600", "COMPRESSED": "true", "EMPTY": "", "MAC": "52:54:00:12:34:56"},
    )

    environment = spec_for(action).environment

    assert environment == {
        "MODE": "0600",
        "COMPRESSED": "true",
        "EMPTY": "",
        "MAC": "52:54:00:12:34:56",
    }


@pytest.mark.parametrize("key", ["", "A=B", "NUL\0"])
def test_environment_invalid_name_rejected(key: str) -> None:
    action = Action(name="a", image="img", environment={key: "x"})

    with pytest.raises(ActionSpecError, match="invalid environment variable name"):
        spec_for(action)


# --- Volumes --------------------------------------------------------------------------------


def test_volumes_workflow_bind_first() -> None:
    spec = spec_for(Action(name="a", image="img"))

    assert spec.volumes == (f"{WORKFLOW_DIR}:/workflow",)
    assert spec.workflow_dir == WORKFLOW_DIR


def test_volumes_action_replaces_task_target() -> None:
    action = Action(name="a", image="img", volumes=("/host/action:/data:ro", "/dev:/dev"))
    task = make_task(action, volumes=("/host/task:/data/", "/etc/ssl:/etc/ssl:ro"))

    volumes = spec_for(action, task).volumes

    assert volumes == (
        f"{WORKFLOW_DIR}:/workflow",
        "/etc/ssl:/etc/ssl:ro",
        "/host/action:/data:ro",
        "/dev:/dev",
    )


@pytest.mark.parametrize(
    "owner",
    ["task", "action"],
)
def test_volumes_duplicate_target_in_one_list(owner: str) -> None:
    duplicate = ("/a:/data", "/b:/data/")
    action = Action(name="a", image="img", volumes=duplicate if owner == "action" else ())
    task = make_task(action, volumes=duplicate if owner == "task" else ())

    with pytest.raises(DuplicateVolumeTargetError) as raised:
        spec_for(action, task)

    assert raised.value.target == "/data"
    assert raised.value.volumes == duplicate
    assert owner in str(raised.value)


def test_volumes_workflow_target_reserved() -> None:
    action = Action(name="a", image="img", volumes=("/elsewhere:/workflow",))

    with pytest.raises(ActionSpecError, match="reserved"):
        spec_for(action)


@pytest.mark.parametrize("volume", ["", "/a:", ":/b", "/a:/b:ro:extra", "/a:relative"])
def test_volumes_malformed_rejected(volume: str) -> None:
    action = Action(name="a", image="img", volumes=(volume,))

    with pytest.raises(ActionSpecError, match="invalid"):
        spec_for(action)


def test_volumes_anonymous_and_named_accepted() -> None:
    action = Action(name="a", image="img", volumes=("/scratch", "cache:/cache"))

    volumes = spec_for(action).volumes

    assert volumes[1:] == ("/scratch", "cache:/cache")


def test_workflow_dir_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)

    spec = spec_for(Action(name="a", image="img"), workflow_dir=Path("state/wf-1"))

    assert spec.workflow_dir == tmp_path / "state" / "wf-1"
    assert spec.volumes == (f"{tmp_path}/state/wf-1:/workflow",)


def test_workflow_dir_with_colon_rejected() -> None:
    with pytest.raises(ValueError, match="contains ':'"):
        spec_for(Action(name="a", image="img"), workflow_dir=Path("/srv/a:b"))


# --- Names and labels -----------------------------------------------------------------------

AWKWARD_NAMES = [
    "stream ubuntu image",
    "écrire le disque 💾",
    "install/../../etc/passwd",
    "  ",
    "---",
    "日本語のアクション",
    "a" * 500,
    "tab\tand\nnewline",
]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_container_name_is_docker_safe(name: str) -> None:
    spec = spec_for(Action(name=name, image="img"), workflow_id="wf-" + "x" * 60, index=12)

    assert CONTAINER_NAME_PATTERN.fullmatch(spec.name)
    assert len(spec.name) <= CONTAINER_NAME_MAX_LENGTH
    assert spec.name.startswith("tinkops-wf-")


def test_container_name_keeps_readable_part() -> None:
    spec = spec_for(Action(name="stream ubuntu image", image="img"), index=3)

    assert spec.name.startswith("tinkops-wf-1-3-stream-ubuntu-image-")


def test_container_names_unique() -> None:
    names = {
        spec_for(Action(name=name, image="img")).name
        for name in ["a b", "a/b", "a-b", "a_b", "a  b", "á b"]
    }
    names.add(spec_for(Action(name="a b", image="img"), index=1).name)
    names.add(spec_for(Action(name="a b", image="img"), workflow_id="wf-2").name)
    names.add(spec_for(Action(name="a b", image="img"), workflow_dir=Path("/other")).name)

    assert len(names) == 9


def test_container_name_stable() -> None:
    action = Action(name="stream ubuntu image", image="img")

    assert spec_for(action).name == spec_for(action).name


def test_labels_identify_action() -> None:
    action = Action(name="stream ubuntu image", image="img")

    labels = spec_for(action, index=4).labels

    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_WORKFLOW] == "wf-1"
    assert labels[LABEL_WORKER] == "08:00:27:00:00:01"
    assert labels[LABEL_TASK] == "os-installation"
    assert labels[LABEL_ACTION] == "stream ubuntu image"
    assert labels[LABEL_ACTION_INDEX] == "4"


# --- Command, pid, timeout ------------------------------------------------------------------


def test_command_and_pid_pass_through() -> None:
    action = Action(name="a", image="quay.io/x/y:1", command=("kexec", "-e"), pid="host")

    spec = spec_for(action)

    assert spec.image == "quay.io/x/y:1"
    assert spec.command == ("kexec", "-e")
    assert spec.pid == "host"


def test_command_missing_stays_none() -> None:
    spec = spec_for(Action(name="a", image="img"))

    assert spec.command is None
    assert spec.pid is None


@pytest.mark.parametrize(
    ("action_timeout", "default_timeout", "expected"),
    [
        (90, None, 90.0),
        (90, 3600.0, 90.0),
        (0, None, None),
        (0, 3600.0, 3600.0),
        (-5, 600.0, 600.0),
    ],
)
def test_timeout_semantics(
    action_timeout: int, default_timeout: float | None, expected: float | None
) -> None:
    action = Action(name="a", image="img", timeout=action_timeout)

    assert spec_for(action, default_timeout=default_timeout).timeout == expected


def test_default_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="default_timeout"):
        spec_for(Action(name="a", image="img"), default_timeout=0)


def test_spec_rejects_unsafe_name() -> None:
    with pytest.raises(ValueError, match="container name"):
        ContainerSpec(
            name="has space",
            image="img",
            command=None,
            environment={},
            volumes=(),
            pid=None,
            workflow_dir=WORKFLOW_DIR,
            timeout=None,
        )


# --- Log tails ------------------------------------------------------------------------------


def test_tail_lines_limits_lines() -> None:
    text = "".join(f"line {n}\n" for n in range(1, 201))

    tail = tail_lines(text, max_lines=50)

    assert tail.splitlines() == [f"line {n}" for n in range(151, 201)]


def test_tail_lines_limits_bytes() -> None:
    text = "\n".join("x" * 99 for _ in range(30))

    tail = tail_lines(text, max_lines=50, max_bytes=1000)

    assert len(tail.encode()) <= 1000
    assert tail.splitlines() == ["x" * 99] * 10


def test_tail_lines_cuts_giant_last_line() -> None:
    text = "first\n" + "é" * 10_000

    tail = tail_lines(text, max_bytes=101)

    assert len(tail.encode()) <= 101
    assert set(tail) == {"é"}


def test_tail_lines_empty() -> None:
    assert tail_lines("") == ""
    assert tail_lines("a\nb\n", max_lines=0) == ""


def test_read_log_tail_large_file(tmp_path: Path) -> None:
    log = tmp_path / "action.log"
    log.write_bytes(b"".join(b"%d\n" % n for n in range(200_000)))

    tail = read_log_tail(log)

    assert tail.splitlines() == [str(n) for n in range(199_950, 200_000)]


def test_read_log_tail_missing_file(tmp_path: Path) -> None:
    assert read_log_tail(tmp_path / "absent.log") == ""
