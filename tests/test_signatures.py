"""SSH-signed events through real git and ssh-keygen: good, unsigned, another worker's key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tinkops.gitops import commit_file
from tinkops.home import init_home
from tinkops.identities import Principal, Role, generate_ed25519_key
from tinkops.pushpolicy import RefUpdate
from tinkops.reconciler import Reconciler, read_status
from tinkops.signatures import (
    EventVerifier,
    check_signed_updates,
    signers_at,
    split_signature,
)
from tinkops_agent.agent import Agent, AgentConfig
from tinkops_agent.cli import build_parser
from tinkops_agent.eventlog import append_event, new_event_id, read_head, utc_now
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.process_runtime import ProcessRuntime
from tinkops_agent.protocol import Event, EventKind, State, apply_action_event, workflow_ref
from tinkops_agent.remote import Remote

WORKER_1 = "08:00:27:00:00:01"
WORKER_2 = "08:00:27:00:00:02"
AGENT = Identity("tinkops agent", "agent@agents.tinkops.invalid")
TWO_WORKERS = """\
name: two
tasks:
  - name: first
    worker: "{{ device_1 }}"
    actions:
      - name: one
        image: busybox
        command: ["true"]
  - name: second
    worker: "{{ device_2 }}"
    actions:
      - name: two
        image: busybox
        command: ["true"]
"""


class Site:
    """A provisioner repository with two machines, each with its own agent key."""

    def __init__(self, tmp_path: Path) -> None:
        home = tmp_path / "home"
        init_home(home, include_requests=False, port=0)
        self.repo = GitRepo(home / "repository.git")
        self.scratch = tmp_path / "scratch"
        self.keys = {WORKER_1: home / "keys" / "agent-machine1", WORKER_2: tmp_path / "machine2"}
        public = generate_ed25519_key(self.keys[WORKER_2], "agent@machine2")
        record = (
            "id: 7f9f2a51-8a0e-4a4e-9d1e-0d6f64a4c2b2\nnetwork:\n  interfaces:\n"
            f"    - dhcp:\n        mac: {WORKER_2}\n        hostname: machine2\n"
            f"agent:\n  keys:\n    - {public}\n"
        )
        commit_file(self.repo, "hardware/machine2.yaml", record.encode(), "Add machine2\n")
        commit_file(self.repo, "templates/two.yaml", TWO_WORKERS.encode(), "Add two\n")
        request = f"template: two\nhardware_map:\n  device_1: {WORKER_1}\n  device_2: {WORKER_2}\n"
        commit_file(self.repo, "workflows/wf.yaml", request.encode(), "Request wf\n")
        assert Reconciler(self.repo).reconcile().created == ("wf",)

    @property
    def tip(self) -> str:
        tip = self.repo.rev_parse(workflow_ref("wf"))
        assert tip is not None
        return tip

    def event(
        self,
        parent: str,
        *,
        worker: str = WORKER_1,
        index: int = 0,
        key: Path | None = None,
    ) -> str:
        """Write (but do not publish) an event of ``worker`` starting action ``index``."""
        head = read_head(self.repo, parent)
        status = apply_action_event(head.status, index, State.RUNNING, at=utc_now())
        task, action = head.workflow.flat_actions()[index]
        event = Event(
            kind=EventKind.ACTION,
            workflow="wf",
            workflow_state=status.state,
            worker=worker,
            message="Started execution",
            event_id=new_event_id(),
            created_at=utc_now(),
            task=task.name,
            action=action.name,
            action_index=index,
            action_state=State.RUNNING,
        )
        return append_event(self.repo, parent, status, event, AGENT, signing_key=key)

    def verifier(self) -> EventVerifier:
        main = self.repo.rev_parse("refs/heads/main")
        assert main is not None
        return EventVerifier(self.repo, signers_at(self.repo, main), self.scratch)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_signed_event_is_valid(site: Site) -> None:
    root = site.tip
    commit = site.event(root, key=site.keys[WORKER_1])

    verdict = site.verifier().verify_ref("wf", commit)

    assert verdict.invalid is None
    assert verdict.last_valid == commit


def test_signature_is_git_compatible(site: Site, tmp_path: Path) -> None:
    commit = site.event(site.tip, key=site.keys[WORKER_1])
    raw = site.repo.run("cat-file", "commit", commit)
    _payload, signature = split_signature(raw)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(site.verifier().signers.text())

    result = subprocess.run(
        [
            "git",
            "-C",
            str(site.repo.path),
            "-c",
            f"gpg.ssh.allowedSignersFile={allowed}",
            "verify-commit",
            commit,
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert signature is not None
    assert signature.startswith(b"-----BEGIN SSH SIGNATURE-----")
    assert result.returncode == 0, result.stderr
    assert 'Good "git" signature for machine1' in result.stderr


def test_unsigned_event_is_invalid(site: Site) -> None:
    root = site.tip
    commit = site.event(root)

    verdict = site.verifier().verify_ref("wf", commit)

    assert verdict.invalid is not None
    assert verdict.invalid.commit == commit
    assert "is not signed" in verdict.invalid.reason
    assert verdict.last_valid == root


def test_other_workers_key_is_invalid(site: Site) -> None:
    root = site.tip
    commit = site.event(root, worker=WORKER_1, key=site.keys[WORKER_2])

    verdict = site.verifier().verify_ref("wf", commit)

    assert verdict.invalid is not None
    assert "no key of machine1 made" in verdict.invalid.reason
    assert verdict.last_valid == root


def test_unknown_key_is_invalid(site: Site, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    generate_ed25519_key(stranger)
    commit = site.event(site.tip, key=stranger)

    verdict = site.verifier().verify_ref("wf", commit)

    assert verdict.invalid is not None
    assert "no key of machine1 made" in verdict.invalid.reason


def test_first_invalid_event_ends_history(site: Site) -> None:
    good = site.event(site.tip, key=site.keys[WORKER_1])
    unsigned = site.event(good)
    later = site.event(unsigned, key=site.keys[WORKER_1])

    verdict = site.verifier().verify_ref("wf", later)

    assert verdict.last_valid == good
    assert verdict.invalid is not None
    assert verdict.invalid.commit == unsigned


def test_check_resumes_after_known_commit(site: Site) -> None:
    good = site.event(site.tip, key=site.keys[WORKER_1])
    unsigned = site.event(good)

    verdict = site.verifier().verify_ref("wf", unsigned, since=good)

    assert verdict.invalid is not None
    assert verdict.invalid.commit == unsigned


def test_signed_event_of_others_action_is_invalid(site: Site) -> None:
    # Signed with machine2's own key and naming machine2, but for machine1's action.
    commit = site.event(site.tip, worker=WORKER_2, index=0, key=site.keys[WORKER_2])

    verdict = site.verifier().verify_ref("wf", commit)

    assert verdict.invalid is not None
    assert "breaks the push policy" in verdict.invalid.reason
    assert "runs on 08:00:27:00:00:01" in verdict.invalid.reason


def test_push_check_rejects_unsigned(site: Site) -> None:
    pusher = Principal(Role.WORKER, "machine1", "", (WORKER_1,))
    root = site.tip
    signed = site.event(root, key=site.keys[WORKER_1])
    unsigned = site.event(root)
    ref = workflow_ref("wf")

    accepted = check_signed_updates(site.repo, pusher, [RefUpdate(root, signed, ref)])
    rejected = check_signed_updates(site.repo, pusher, [RefUpdate(root, unsigned, ref)])

    assert accepted == []
    assert len(rejected) == 1
    assert rejected[0].ref == ref
    assert "is not signed" in rejected[0].reason


def test_push_check_leaves_operators_alone(site: Site) -> None:
    operator = Principal(Role.OPERATOR, "operator", "")
    root = site.tip
    unsigned = site.event(root)

    updates = [RefUpdate(root, unsigned, workflow_ref("wf"))]

    assert check_signed_updates(site.repo, operator, updates) == []


def test_status_records_signature_requirement(site: Site) -> None:
    Reconciler(site.repo, require_signed_events=True).reconcile()

    status = read_status(site.repo, "main")

    assert status.require_signed_events is True


@pytest.mark.parametrize(
    ("required", "option", "signed"),
    [(True, None, True), (False, None, False), (False, True, True), (True, False, False)],
)
def test_agent_signing_option(
    tmp_path: Path, required: bool, option: bool | None, signed: bool
) -> None:
    site = Site(tmp_path)
    Reconciler(site.repo, require_signed_events=required).reconcile()
    local_path = tmp_path / "agent" / "repository.git"
    local_path.mkdir(parents=True)
    local = GitRepo(local_path)
    local.run("init", "--quiet", "--bare")
    config = AgentConfig(
        worker_id=WORKER_1,
        state_dir=tmp_path / "agent",
        sign_events=option,
        signing_key=site.keys[WORKER_1],
    )
    agent = Agent(config, local, Remote(local, str(site.repo.path), "ssh"), ProcessRuntime())

    assert agent.step()

    commits = site.repo.text("rev-list", f"{site.tip}^{{/Create workflow}}..{site.tip}").split()
    raws = [site.repo.run("cat-file", "commit", commit) for commit in commits]
    assert len(raws) == 2  # RUNNING and SUCCESS of machine1's action
    assert all((split_signature(raw)[1] is not None) is signed for raw in raws)
    verdict = site.verifier().verify_ref("wf", site.tip)
    assert (verdict.invalid is None) is signed


def test_agent_option_parses() -> None:
    parser = build_parser()

    assert parser.parse_args(["--sign-events"]).sign_events is True
    assert parser.parse_args(["--no-sign-events"]).sign_events is False
    assert parser.parse_args([]).sign_events is None
