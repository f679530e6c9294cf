"""Workflow execution with Tinkerbell's semantics, through real agents, SSH and Docker:
hand-off between workers, queues, timeouts, failures, data limits and restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    WORKER_1,
    Served,
    push_files,
    request,
    run_git,
    serve,
    tinkops,
    wait_for,
    workflow_state,
)
from tinkops.identities import generate_ed25519_key
from tinkops_agent.agent import RESTART_MESSAGE

WORKER_2 = "08:00:27:00:00:02"


@pytest.fixture
def served(tmp_path: Path, openssh_client: str) -> Iterator[Served]:
    provisioner = serve(tmp_path / "provisioner")
    yield provisioner
    provisioner.stop()


def template(
    name: str, tasks: list[tuple[str, list[dict[str, object]]]], *, global_timeout: int = 300
) -> str:
    """Return a template as JSON (valid YAML): tasks of (worker placeholder, actions)."""
    document = {
        "version": "0.1",
        "name": name,
        "global_timeout": global_timeout,
        "tasks": [
            {"name": f"task-{index}", "worker": worker, "actions": actions}
            for index, (worker, actions) in enumerate(tasks)
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def action(
    name: str, script: str, image: str, *, timeout: int = 60, **extra: object
) -> dict[str, object]:
    return {
        "name": name,
        "image": image,
        "timeout": timeout,
        "command": ["/bin/sh", "-c", script],
        **extra,
    }


def events(served: Served, workflow_id: str) -> list[dict[str, str]]:
    result = tinkops("workflow", "events", workflow_id, "-o", "json", "--repo", str(served.home))
    return list(json.loads(result.stdout))


def finished(served: Served, workflow_id: str, timeout: float = 90) -> dict[str, str]:
    return dict(
        wait_for(
            lambda: (
                (state := workflow_state(served, workflow_id)).get("Workflow State")
                not in (None, "PENDING", "RUNNING")
                and state
            ),
            timeout=timeout,
            what=f"workflow {workflow_id} to end",
        )
    )


def wait_running(served: Served, workflow_id: str, action_name: str) -> None:
    wait_for(
        lambda: any(
            e["action_name"] == action_name and e["action_status"] == "STATE_RUNNING"
            for e in events(served, workflow_id)
        ),
        60,
        f"{action_name} to start",
    )


def ephemeral(served: Served, workflow_id: str, name: str) -> bytes | None:
    result = subprocess.run(
        [
            "git",
            "-C",
            str(served.repository),
            "show",
            f"refs/tinkops/workflows/{workflow_id}:ephemeral/{name}",
        ],
        capture_output=True,
        check=False,
    )
    return result.stdout if result.returncode == 0 else None


def add_second_machine(served: Served, clone: Path, tmp_path: Path) -> Path:
    key = tmp_path / "agent-machine2"
    public = generate_ed25519_key(key, "tinkops-agent@machine2")
    record = (
        f"id: 7f9f2a51-8a0e-4a4e-9d1e-0d6f64a4c2b2\nnetwork:\n  interfaces:\n"
        f"    - dhcp:\n        mac: {WORKER_2}\n        hostname: machine2\n"
        f"agent:\n  keys:\n    - {public}\n"
    )
    push_files(served, clone, {"hardware/machine2.yaml": record}, "Add machine2")
    return key


def test_two_workers_hand_off_with_data(served: Served, tmp_path: Path, busybox_image: str) -> None:
    clone = served.clone(tmp_path / "operator")
    key2 = add_second_machine(served, clone, tmp_path)
    text = template(
        "handoff",
        [
            (
                "{{ device_1 }}",
                [
                    action(
                        "write",
                        'echo "from-1" > /workflow/data; echo A > /workflow/a',
                        busybox_image,
                    )
                ],
            ),
            (
                "{{ device_2 }}",
                [
                    action(
                        "read",
                        "cat /workflow/data > /workflow/seen-by-2; test -f /workflow/a",
                        busybox_image,
                    )
                ],
            ),
        ],
    )
    push_files(
        served,
        clone,
        {
            "templates/handoff.yaml": text,
            "workflows/handoff-1.yaml": (
                f"template: handoff\nhardware_map:\n  device_1: {WORKER_1}\n"
                f"  device_2: {WORKER_2}\n"
            ),
        },
        "Request a two-worker workflow",
    )
    served.start_agent(tmp_path / "agent1")
    served.start_agent(tmp_path / "agent2", worker=WORKER_2, key=key2)

    state = finished(served, "handoff-1")

    assert state["Workflow State"] == "SUCCESS"
    observed = [
        (e["worker_id"], e["action_name"], e["action_status"]) for e in events(served, "handoff-1")
    ]
    assert observed == [
        (WORKER_1, "write", "STATE_RUNNING"),
        (WORKER_1, "write", "STATE_SUCCESS"),
        (WORKER_2, "read", "STATE_RUNNING"),
        (WORKER_2, "read", "STATE_SUCCESS"),
    ]
    assert ephemeral(served, "handoff-1", "seen-by-2") == b"from-1\n"


def test_queued_workflows_run_in_creation_order(
    served: Served, tmp_path: Path, busybox_image: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    clone = served.clone(tmp_path / "operator")
    step = action("append", 'echo "$WORKFLOW_ID" >> /shared/order', busybox_image)
    text = template(
        "queued",
        [
            (
                "{{ device_1 }}",
                [
                    {
                        **step,
                        "volumes": [f"{shared}:/shared"],
                        "environment": {"WORKFLOW_ID": "{{ values.id }}"},
                    }
                ],
            )
        ],
    )
    push_files(served, clone, {"templates/queued.yaml": text}, "Add queued template")
    names = ["c-first", "b-second", "a-third"]
    for name in names:
        push_files(
            served,
            clone,
            {f"workflows/{name}.yaml": request("queued") + f"values:\n  id: {name}\n"},
            f"Request {name}",
        )
        wait_for(lambda n=name: workflow_state(served, n), 30, f"{name} to render")

    served.start_agent(tmp_path / "agent")
    for name in names:
        assert finished(served, name)["Workflow State"] == "SUCCESS"

    assert (shared / "order").read_text().split() == names


def test_global_timeout_with_agent_alive(
    served: Served, tmp_path: Path, busybox_image: str
) -> None:
    clone = served.clone(tmp_path / "operator")
    text = template(
        "slow",
        [
            (
                "{{ device_1 }}",
                [
                    action("one", "sleep 1", busybox_image),
                    action("two", "sleep 60", busybox_image, timeout=120),
                    action("three", "echo never > /workflow/three", busybox_image),
                ],
            )
        ],
        global_timeout=10,
    )
    push_files(
        served,
        clone,
        {"templates/slow.yaml": text, "workflows/slow-1.yaml": request("slow")},
        "Request slow-1",
    )
    served.start_agent(tmp_path / "agent")

    state = finished(served, "slow-1", timeout=60)

    assert state["Workflow State"] == "TIMEOUT"
    assert state["Current Action"] == "two"
    observed = [(e["action_name"], e["action_status"]) for e in events(served, "slow-1")]
    assert observed == [
        ("one", "STATE_RUNNING"),
        ("one", "STATE_SUCCESS"),
        ("two", "STATE_RUNNING"),
        ("two", "STATE_TIMEOUT"),
    ]
    assert "global_timeout of 10 s exceeded" in events(served, "slow-1")[-1]["message"]
    assert ephemeral(served, "slow-1", "three") is None


def test_global_timeout_with_agent_stopped(
    tmp_path: Path, openssh_client: str, busybox_image: str
) -> None:
    home = tmp_path / "provisioner"
    tinkops("init", str(home), "--port", "0", "--no-requests")
    config = home / "config.yaml"
    config.write_text(config.read_text().replace("timeout_grace: 10.0", "timeout_grace: 1.0"))
    served = serve(home, init_args=None)
    try:
        clone = served.clone(tmp_path / "operator")
        text = template(
            "stuck",
            [
                (
                    "{{ device_1 }}",
                    [
                        action("hang", "sleep 60", busybox_image, timeout=120),
                        action("after", "echo never", busybox_image),
                    ],
                )
            ],
            global_timeout=3,
        )
        push_files(
            served,
            clone,
            {"templates/stuck.yaml": text, "workflows/stuck-1.yaml": request("stuck")},
            "Request",
        )
        agent = served.start_agent(tmp_path / "agent")
        wait_running(served, "stuck-1", "hang")
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()

        state = finished(served, "stuck-1", timeout=30)

        assert state["Workflow State"] == "TIMEOUT"
        observed = [
            (e["action_name"], e["action_status"], e["worker_id"])
            for e in events(served, "stuck-1")
        ]
        assert observed == [("hang", "STATE_RUNNING", WORKER_1), ("", "TIMEOUT", "")]
        message = events(served, "stuck-1")[-1]["message"]
        assert "recorded by the provisioner" in message
    finally:
        served.stop()


def test_agent_killed_mid_action_then_restarted(
    served: Served, tmp_path: Path, busybox_image: str, docker_client: object
) -> None:
    clone = served.clone(tmp_path / "operator")
    text = template(
        "crash",
        [
            (
                "{{ device_1 }}",
                [
                    action("long", "sleep 20", busybox_image),
                    action("next", "echo ran > /workflow/next", busybox_image),
                ],
            )
        ],
    )
    push_files(
        served,
        clone,
        {"templates/crash.yaml": text, "workflows/crash-1.yaml": request("crash")},
        "Request crash-1",
    )
    agent = served.start_agent(tmp_path / "agent")
    wait_running(served, "crash-1", "long")
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()

    served.start_agent(tmp_path / "agent")
    state = finished(served, "crash-1")

    assert state["Workflow State"] == "FAILED"
    observed = [(e["action_name"], e["action_status"]) for e in events(served, "crash-1")]
    assert observed == [("long", "STATE_RUNNING"), ("long", "STATE_FAILED")]
    assert events(served, "crash-1")[-1]["message"] == RESTART_MESSAGE
    assert ephemeral(served, "crash-1", "next") is None
    leftovers = docker_client.containers.list(  # type: ignore[attr-defined]
        all=True, filters={"label": "tinkops.workflow=crash-1"}
    )
    assert leftovers == []


def test_oversized_data_fails_and_keeps_previous(
    served: Served, tmp_path: Path, busybox_image: str
) -> None:
    clone = served.clone(tmp_path / "operator")
    text = template(
        "big",
        [
            (
                "{{ device_1 }}",
                [
                    action("small", 'echo "{\\"kept\\": true}" > /workflow/data', busybox_image),
                    action(
                        "stream ubuntu image",
                        "dd if=/dev/zero of=/workflow/big bs=1048576 count=11",
                        busybox_image,
                    ),
                ],
            )
        ],
    )
    push_files(
        served,
        clone,
        {"templates/big.yaml": text, "workflows/big-1.yaml": request("big")},
        "Request big-1",
    )
    served.start_agent(tmp_path / "agent")

    state = finished(served, "big-1")

    assert state["Workflow State"] == "FAILED"
    last = events(served, "big-1")[-1]
    assert last["action_name"] == "stream ubuntu image"
    assert "exceeds the limit of 10485760 bytes" in last["message"]
    assert json.loads(ephemeral(served, "big-1", "data") or b"") == {"kept": True}
    assert ephemeral(served, "big-1", "big") is None


def test_environment_reaches_container_as_written(
    served: Served, tmp_path: Path, busybox_image: str
) -> None:
    clone = served.clone(tmp_path / "operator")
    text = (
        'version: "0.1"\nname: env\ntasks:\n  - name: t\n    worker: "{{.device_1}}"\n'
        "    environment:\n      MODE: 0600\n      FLAG: yes\n    actions:\n"
        f"      - name: dump\n        image: {busybox_image}\n        environment:\n"
        "          FLAG: true\n          MAC: 52:54:00:12:34:56\n"
        '        command: ["/bin/sh", "-c", "env > /workflow/env"]\n'
    )
    push_files(
        served,
        clone,
        {"templates/env.yaml": text, "workflows/env-1.yaml": request("env")},
        "Request env-1",
    )
    served.start_agent(tmp_path / "agent")

    assert finished(served, "env-1")["Workflow State"] == "SUCCESS"
    variables = dict(
        line.split("=", 1)
        for line in (ephemeral(served, "env-1", "env") or b"").decode().splitlines()
        if "=" in line
    )
    assert variables["MODE"] == "0600"
    assert variables["FLAG"] == "true"
    assert variables["MAC"] == "52:54:00:12:34:56"


def test_on_failure_handler_recorded(served: Served, tmp_path: Path, busybox_image: str) -> None:
    clone = served.clone(tmp_path / "operator")
    text = template(
        "handler",
        [
            (
                "{{ device_1 }}",
                [
                    action(
                        "breaks",
                        "exit 4",
                        busybox_image,
                        **{"on-failure": ["/bin/sh", "-c", "echo cleaned > /workflow/cleanup"]},
                    ),
                ],
            )
        ],
    )
    push_files(
        served,
        clone,
        {"templates/handler.yaml": text, "workflows/handler-1.yaml": request("handler")},
        "Request",
    )
    served.start_agent(tmp_path / "agent")

    assert finished(served, "handler-1")["Workflow State"] == "FAILED"
    wait_for(lambda: len(events(served, "handler-1")) == 3, 30, "the handler event")
    last = events(served, "handler-1")[-1]
    assert last["message"].startswith("on-failure handler ended SUCCESS")
    log = run_git(
        [
            "-C",
            str(served.repository),
            "log",
            "-1",
            "--format=%B",
            "refs/tinkops/workflows/handler-1",
        ]
    )
    assert "Tinkops-Event: handler" in log


def test_retries_recorded_then_success(served: Served, tmp_path: Path, busybox_image: str) -> None:
    clone = served.clone(tmp_path / "operator")
    script = (
        "n=$(cat /workflow/tries 2>/dev/null || echo 0); n=$((n + 1)); "
        'echo $n > /workflow/tries; test "$n" -ge 3'
    )
    text = template(
        "flaky",
        [
            (
                "{{ device_1 }}",
                [
                    action("flaky", script, busybox_image, retries=3),
                ],
            )
        ],
    )
    push_files(
        served,
        clone,
        {"templates/flaky.yaml": text, "workflows/flaky-1.yaml": request("flaky")},
        "Request flaky-1",
    )
    served.start_agent(tmp_path / "agent")

    assert finished(served, "flaky-1")["Workflow State"] == "SUCCESS"
    history = events(served, "flaky-1")
    assert [e["action_status"] for e in history] == ["STATE_RUNNING"] * 3 + ["STATE_SUCCESS"]
    assert history[1]["message"].startswith("attempt 1 of 4 failed (exited with code 1")
    assert history[2]["message"].startswith("attempt 2 of 4 failed (exited with code 1")
    assert history[3]["message"].startswith("exited with code 0")
    assert ephemeral(served, "flaky-1", "tries") == b"3\n"


def test_cancel_stops_running_container(
    served: Served, tmp_path: Path, busybox_image: str, docker_client: object
) -> None:
    clone = served.clone(tmp_path / "operator")
    text = template(
        "cancel",
        [
            (
                "{{ device_1 }}",
                [
                    action("long", "sleep 60", busybox_image, timeout=120),
                    action("after", "echo never > /workflow/after", busybox_image),
                ],
            )
        ],
    )
    push_files(
        served,
        clone,
        {"templates/cancel.yaml": text, "workflows/cancel-1.yaml": request("cancel")},
        "Request",
    )
    served.start_agent(tmp_path / "agent")
    wait_running(served, "cancel-1", "long")

    push_files(
        served,
        clone,
        {"workflows/cancel-1.yaml": request("cancel") + "cancel: true\n"},
        "Cancel cancel-1",
    )
    state = finished(served, "cancel-1", timeout=60)

    assert state["Workflow State"] == "CANCELLED"
    wait_for(lambda: len(events(served, "cancel-1")) == 3, 30, "the agent's stop event")
    observed = [(e["action_name"], e["action_status"]) for e in events(served, "cancel-1")]
    assert observed == [("long", "STATE_RUNNING"), ("", "CANCELLED"), ("long", "STATE_CANCELLED")]
    assert "container stopped" in events(served, "cancel-1")[-1]["message"]
    assert ephemeral(served, "cancel-1", "after") is None
    running = docker_client.containers.list(  # type: ignore[attr-defined]
        filters={"label": "tinkops.workflow=cancel-1"}
    )
    assert running == []


def test_reboot_action_succeeds_across_restart(
    served: Served, tmp_path: Path, busybox_image: str
) -> None:
    clone = served.clone(tmp_path / "operator")
    text = template(
        "reboot",
        [
            (
                "{{ device_1 }}",
                [
                    action("reboot", "sleep 30", busybox_image, reboot=True),
                    action("after reboot", "echo booted > /workflow/after", busybox_image),
                ],
            )
        ],
    )
    push_files(
        served,
        clone,
        {"templates/reboot.yaml": text, "workflows/reboot-1.yaml": request("reboot")},
        "Request",
    )
    agent = served.start_agent(tmp_path / "agent")
    wait_running(served, "reboot-1", "reboot")
    os.kill(agent.pid, signal.SIGKILL)  # the machine goes down mid-action, as a reboot does
    agent.wait()

    served.start_agent(tmp_path / "agent")
    state = finished(served, "reboot-1")

    assert state["Workflow State"] == "SUCCESS"
    observed = [(e["action_name"], e["action_status"]) for e in events(served, "reboot-1")]
    assert observed == [
        ("reboot", "STATE_RUNNING"),
        ("reboot", "STATE_SUCCESS"),
        ("after reboot", "STATE_RUNNING"),
        ("after reboot", "STATE_SUCCESS"),
    ]
    assert ephemeral(served, "reboot-1", "after") == b"booted\n"
