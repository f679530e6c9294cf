"""The agent's loop against real git: ordering, the outbox and the restart policy.

The provisioner here is a bare repository reached by path (git needs no SSH for that) and
actions run with the process runtime; the SSH and Docker paths are covered end to end in
tests/test_end_to_end.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tinkops.gitops import commit_file
from tinkops.home import init_home
from tinkops.reconciler import Reconciler
from tinkops_agent.agent import OUTBOX, RESTART_MESSAGE, Agent, AgentConfig, Stopping
from tinkops_agent.eventlog import append_event, new_event_id, read_events, read_head, utc_now
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.process_runtime import ProcessRuntime
from tinkops_agent.protocol import Event, EventKind, State, apply_action_event, workflow_ref
from tinkops_agent.remote import PushOutcome, PushResult, Remote

WORKER = "08:00:27:00:00:01"
TEMPLATE = """\
name: steps
tasks:
  - name: t
    worker: "{{ device_1 }}"
    actions:
      - name: first
        image: busybox
        command: ["/bin/sh", "-c", "echo one >> \\"$WORKFLOW_DIR/log\\""]
      - name: second
        image: busybox
        command: ["/bin/sh", "-c", "echo two >> \\"$WORKFLOW_DIR/log\\""]
"""


@pytest.fixture
def provisioner(tmp_path: Path) -> GitRepo:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    commit_file(repo, "templates/steps.yaml", TEMPLATE.encode(), "Add steps\n")
    return repo


def request(repo: GitRepo, workflow_id: str) -> None:
    text = f"template: steps\nhardware_map:\n  device_1: {WORKER}\n"
    commit_file(repo, f"workflows/{workflow_id}.yaml", text.encode(), "Request\n")
    Reconciler(repo).reconcile()


def make_agent(tmp_path: Path, provisioner: GitRepo, remote: Remote | None = None) -> Agent:
    local_path = tmp_path / "agent" / "repository.git"
    if not local_path.exists():
        local_path.mkdir(parents=True)
        GitRepo(local_path).run("init", "--quiet", "--bare")
    local = GitRepo(local_path)
    remote = remote or Remote(local, str(provisioner.path), "ssh")
    config = AgentConfig(worker_id=WORKER.upper(), state_dir=tmp_path / "agent", poll_interval=0.05)
    return Agent(config, local, remote, ProcessRuntime())


def actions_seen(provisioner: GitRepo, workflow_id: str) -> list[tuple[str, str]]:
    return [
        (event.action, event.action_state.value if event.action_state else "")
        for _commit, event in read_events(provisioner, workflow_ref(workflow_id))
    ]


def test_agent_runs_workflows_in_creation_order(tmp_path: Path, provisioner: GitRepo) -> None:
    for workflow_id in ("zz-first", "aa-second", "mm-third"):
        request(provisioner, workflow_id)
    agent = make_agent(tmp_path, provisioner)

    order = []
    while agent.step():
        order.append(
            next(
                wid
                for wid in ("zz-first", "aa-second", "mm-third")
                if wid not in order
                and read_head(
                    provisioner, provisioner.rev_parse(workflow_ref(wid)) or ""
                ).status.state.terminal
            )
        )

    assert order == ["zz-first", "aa-second", "mm-third"]
    for workflow_id in order:
        assert actions_seen(provisioner, workflow_id) == [
            ("first", "RUNNING"),
            ("first", "SUCCESS"),
            ("second", "RUNNING"),
            ("second", "SUCCESS"),
        ]
    head = read_head(provisioner, provisioner.rev_parse(workflow_ref("mm-third")) or "")
    log = provisioner.read_file(head.commit, "ephemeral/log")
    assert log == b"one\ntwo\n"


def test_restart_mid_action_records_failed(tmp_path: Path, provisioner: GitRepo) -> None:
    request(provisioner, "crashed")
    ref = workflow_ref("crashed")
    head = read_head(provisioner, provisioner.rev_parse(ref) or "")
    status = apply_action_event(head.status, 0, State.RUNNING, at=utc_now())
    event = Event(
        kind=EventKind.ACTION,
        workflow="crashed",
        workflow_state=status.state,
        worker=WORKER,
        message="Started execution",
        event_id=new_event_id(),
        created_at=utc_now(),
        task="t",
        action="first",
        action_index=0,
        action_state=State.RUNNING,
    )
    commit = append_event(provisioner, head.commit, status, event, Identity("a", "a@b"))
    assert provisioner.update_ref(ref, commit, head.commit)

    agent = make_agent(tmp_path, provisioner)
    assert agent.step()

    assert actions_seen(provisioner, "crashed") == [("first", "RUNNING"), ("first", "FAILED")]
    final = read_head(provisioner, provisioner.rev_parse(ref) or "")
    assert final.status.state is State.FAILED
    assert final.status.actions[0].message == RESTART_MESSAGE
    assert final.status.actions[1].state is State.PENDING
    assert not agent.step()


class DropPushes(Remote):
    """A remote whose pushes never arrive, as when the network drops after a commit."""

    def push(self, commit: str, workflow_id: str) -> PushResult:
        self.stop.set()
        return PushResult(PushOutcome.UNREACHABLE, "connection dropped")

    stop = threading.Event()


def test_outbox_replayed_once(tmp_path: Path, provisioner: GitRepo) -> None:
    request(provisioner, "outbox")
    local_path = tmp_path / "agent" / "repository.git"
    local_path.mkdir(parents=True)
    local = GitRepo(local_path)
    local.run("init", "--quiet", "--bare")
    dropping = DropPushes(local, str(provisioner.path), "ssh")
    agent = make_agent(tmp_path, provisioner, dropping)
    agent.stop = DropPushes.stop

    with pytest.raises(Stopping):  # the RUNNING event is written locally, its push is lost
        agent.step()

    assert actions_seen(provisioner, "outbox") == []
    pending = local.refs(OUTBOX)
    assert list(pending) == [OUTBOX + "outbox"]

    restarted = make_agent(tmp_path, provisioner)
    restarted.replay_outbox()
    assert actions_seen(provisioner, "outbox") == [("first", "RUNNING")]
    assert local.refs(OUTBOX) == {}

    restarted.replay_outbox()  # nothing left: no duplicate
    assert restarted.step()
    assert actions_seen(provisioner, "outbox") == [("first", "RUNNING"), ("first", "FAILED")]
    final = read_head(provisioner, provisioner.rev_parse(workflow_ref("outbox")) or "")
    assert final.status.actions[0].message == RESTART_MESSAGE
