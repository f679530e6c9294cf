"""Remote mode against a real OpenSSH server with git-shell: the repository lives there, the
reconciler syncs a mirror, and agents push signed events straight to the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import run_git, tinkops, wait_for
from tests.openssh import GitServer, start_git_server
from tinkops.home import init_home
from tinkops.identities import generate_ed25519_key
from tinkops.reconciler import read_status
from tinkops.remote_mode import (
    REJECTED_REF_PREFIX,
    PushRejected,
    RefChange,
    RemoteReconciler,
    RemoteRepository,
    RemoteSettings,
    prepare_remote,
)
from tinkops.signatures import EventVerifier, public_key_of, signers_at
from tinkops_agent.eventlog import append_event, new_event_id, read_events, read_head, utc_now
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.protocol import (
    QUEUE_REF_PREFIX,
    STATUS_REF,
    Event,
    EventKind,
    State,
    apply_action_event,
    workflow_ref,
)

WORKER = "08:00:27:00:00:01"
AGENT = Identity("tinkops agent", "agent@agents.tinkops.invalid")


def template(global_timeout: int, *scripts: str) -> str:
    actions = "".join(
        f"      - name: step-{index}\n        image: busybox\n        timeout: 30\n"
        f"        command: [/bin/sh, -c, {json.dumps(script)}]\n"
        for index, script in enumerate(scripts)
    )
    return (
        f"name: remote\nglobal_timeout: {global_timeout}\ntasks:\n  - name: provision\n"
        f'    worker: "{{{{ device_1 }}}}"\n    actions:\n{actions}'
    )


class Site:
    """An infrastructure repository on sshd, with the keys of the operator, agent and
    reconciler authorized there."""

    def __init__(self, tmp_path: Path, server: GitServer) -> None:
        self.tmp = tmp_path
        self.server = server
        seed = tmp_path / "seed"
        init_home(seed, include_requests=False, port=0)
        # A plain bare repository, as a git server keeps it: no tinkops hooks.
        self.path = tmp_path / "server" / "infra.git"
        run_git(["clone", "--quiet", "--bare", str(seed / "repository.git"), str(self.path)])
        self.repo = GitRepo(self.path)
        self.url = server.url(self.path)
        self.operator_key = seed / "keys" / "operator"
        self.agent_key = seed / "keys" / "agent-machine1"
        self.reconciler_key = tmp_path / "reconciler-key"
        generate_ed25519_key(self.reconciler_key, "tinkops-reconciler")
        for key in (self.operator_key, self.agent_key, self.reconciler_key):
            server.authorize(public_key_of(key))
        self.known_hosts = tmp_path / "known_hosts"
        self.known_hosts.write_text(server.known_hosts_line())
        self.home = tmp_path / "sync"

    def git_env(self, key: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["GIT_SSH_COMMAND"] = (
            f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes"
        )
        return env

    def push_files(self, files: dict[str, str], message: str) -> None:
        """Commit ``files`` on main in the operator's clone and push them over SSH."""
        clone = self.tmp / "operator"
        env = self.git_env(self.operator_key)
        if not clone.exists():
            run_git(["clone", "--quiet", self.url, str(clone)], env=env)
        run_git(["-C", str(clone), "pull", "--quiet", "--rebase", "origin", "main"], env=env)
        for name, text in files.items():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_text(text)
            run_git(["-C", str(clone), "add", name])
        run_git(["-C", str(clone), "commit", "--quiet", "-m", message])
        run_git(["-C", str(clone), "push", "--quiet", "origin", "HEAD:main"], env=env)

    def request(self, workflow_id: str, global_timeout: int, *scripts: str) -> None:
        self.push_files(
            {
                f"templates/{workflow_id}.yaml": template(global_timeout, *scripts).replace(
                    "name: remote", f"name: {workflow_id}"
                ),
                f"workflows/{workflow_id}.yaml": (
                    f"template: {workflow_id}\nhardware_map:\n  device_1: {WORKER}\n"
                ),
            },
            f"Request {workflow_id}",
        )

    def settings(self, **overrides: object) -> RemoteSettings:
        values: dict[str, object] = {
            "url": self.url,
            "key": self.reconciler_key,
            "home": self.home,
            "poll_interval": 0.3,
            "timeout_grace": 0.0,
        }
        values.update(overrides)
        settings = RemoteSettings(**values)  # type: ignore[arg-type]
        prepare_remote(settings, host_key_fingerprint=self.server.fingerprint)
        return settings

    def state(self, workflow_id: str) -> State | None:
        tip = self.repo.rev_parse(workflow_ref(workflow_id))
        return read_head(self.repo, tip).status.state if tip else None

    def queue_refs(self) -> dict[str, str]:
        return self.repo.refs(QUEUE_REF_PREFIX)

    def verifier(self) -> EventVerifier:
        main = self.repo.rev_parse("refs/heads/main")
        assert main is not None
        signers = signers_at(self.repo, main, [public_key_of(self.reconciler_key)])
        return EventVerifier(self.repo, signers, self.tmp / "verify")

    def forge_event(self, workflow_id: str, *, signing_key: Path | None) -> str:
        """Push, with the agent's SSH key, an event that claims the first action succeeded."""
        forger = GitRepo(self.tmp / "forger.git")
        if not forger.path.exists():
            forger.path.mkdir()
            forger.run("init", "--quiet", "--bare")
        env = {"GIT_SSH_COMMAND": self.git_env(self.agent_key)["GIT_SSH_COMMAND"]}
        ref = workflow_ref(workflow_id)
        forger.run("fetch", "--quiet", self.url, f"+{ref}:{ref}", env=env)
        head = read_head(forger, forger.rev_parse(ref) or "")
        status = apply_action_event(head.status, 0, State.SUCCESS, at=utc_now())
        event = Event(
            kind=EventKind.ACTION,
            workflow=workflow_id,
            workflow_state=status.state,
            worker=WORKER,
            message="forged",
            event_id=new_event_id(),
            created_at=utc_now(),
            task="provision",
            action="step-0",
            action_index=0,
            action_state=State.SUCCESS,
        )
        commit = append_event(forger, head.commit, status, event, AGENT, signing_key=signing_key)
        forger.run("push", "--quiet", self.url, f"{commit}:{ref}", env=env)
        return commit


@pytest.fixture
def site(tmp_path: Path, openssh_client: str) -> Iterator[Site]:
    server = start_git_server(tmp_path / "sshd")
    try:
        yield Site(tmp_path, server)
    finally:
        server.stop()


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdout=stream,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_workflow_runs_through_server(site: Site) -> None:
    site.request("wf-remote", 120, "echo one >> data", "echo two >> data")
    sync = start(
        [
            "tinkops.cli",
            "sync",
            "--remote",
            site.url,
            "--key",
            str(site.reconciler_key),
            "--home",
            str(site.home),
            "--host-key-fingerprint",
            site.server.fingerprint,
            "--poll-interval",
            "0.3",
            "-v",
        ],
        site.tmp / "sync.log",
    )
    agent = start(
        [
            "tinkops_agent.cli",
            "--worker-id",
            WORKER,
            "--provisioner",
            site.url,
            "--key",
            str(site.agent_key),
            "--host-key-fingerprint",
            site.server.fingerprint,
            "--state-dir",
            str(site.tmp / "agent"),
            "--runtime",
            "process",
            "--poll-interval",
            "0.2",
        ],
        site.tmp / "agent.log",
    )
    try:
        wait_for(
            lambda: site.state("wf-remote") is State.SUCCESS and not site.queue_refs(),
            timeout=90,
            what="the workflow to succeed and leave the queue on the server",
        )
    finally:
        stop(agent)
        stop(sync)
    logs = (site.tmp / "sync.log").read_text() + (site.tmp / "agent.log").read_text()

    events = read_events(site.repo, workflow_ref("wf-remote"))
    assert [(event.action, event.action_state) for _commit, event in events] == [
        ("step-0", State.RUNNING),
        ("step-0", State.SUCCESS),
        ("step-1", State.RUNNING),
        ("step-1", State.SUCCESS),
    ], logs
    verdict = site.verifier().verify_ref(
        "wf-remote", site.repo.rev_parse(workflow_ref("wf-remote")) or ""
    )
    assert verdict.invalid is None
    status = read_status(site.repo, "main")
    assert status.reconciled_commit == site.repo.rev_parse("refs/heads/main")
    assert status.require_signed_events is True
    assert status.invalid_events == {}


@pytest.mark.parametrize("forger_key", ["none", "stranger"])
def test_forged_event_is_ignored(site: Site, forger_key: str) -> None:
    site.request("wf-forged", 120, "true")
    reconciler = RemoteReconciler(site.settings())
    assert reconciler.sync().created == ("wf-forged",)
    created = site.repo.rev_parse(workflow_ref("wf-forged"))
    stranger = site.tmp / "stranger"
    generate_ed25519_key(stranger)

    forged = site.forge_event("wf-forged", signing_key=None if forger_key == "none" else stranger)
    report = reconciler.sync()

    assert [item.commit for item in report.invalid] == [forged]
    assert site.repo.rev_parse(workflow_ref("wf-forged")) == created
    assert site.state("wf-forged") is State.PENDING
    assert site.repo.rev_parse(f"{REJECTED_REF_PREFIX}wf-forged/{forged}") == forged
    recorded = read_status(site.repo, "main").invalid_events["wf-forged"]
    assert len(recorded) == 1
    assert forged[:12] in recorded[0]

    # The real agent then runs the workflow from its true state.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinkops_agent.cli",
            "--worker-id",
            WORKER,
            "--provisioner",
            site.url,
            "--key",
            str(site.agent_key),
            "--host-key-fingerprint",
            site.server.fingerprint,
            "--state-dir",
            str(site.tmp / "agent"),
            "--runtime",
            "process",
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert site.state("wf-forged") is State.SUCCESS
    assert reconciler.sync().invalid == []


def test_global_timeout_recorded_on_server(site: Site) -> None:
    site.request("wf-timeout", 1, "sleep 60")
    reconciler = RemoteReconciler(site.settings())
    reconciler.sync()
    # The agent starts the action and dies: only its signed RUNNING event reaches the server.
    agent = GitRepo(site.tmp / "agent.git")
    agent.path.mkdir()
    agent.run("init", "--quiet", "--bare")
    env = {"GIT_SSH_COMMAND": site.git_env(site.agent_key)["GIT_SSH_COMMAND"]}
    ref = workflow_ref("wf-timeout")
    agent.run("fetch", "--quiet", site.url, f"+{ref}:{ref}", env=env)
    head = read_head(agent, agent.rev_parse(ref) or "")
    status = apply_action_event(head.status, 0, State.RUNNING, at=utc_now())
    event = Event(
        kind=EventKind.ACTION,
        workflow="wf-timeout",
        workflow_state=status.state,
        worker=WORKER,
        message="Started execution",
        event_id=new_event_id(),
        created_at=utc_now(),
        task="provision",
        action="step-0",
        action_index=0,
        action_state=State.RUNNING,
    )
    commit = append_event(agent, head.commit, status, event, AGENT, signing_key=site.agent_key)
    agent.run("push", "--quiet", site.url, f"{commit}:{ref}", env=env)

    def ended() -> bool:
        reconciler.sync()
        return site.state("wf-timeout") is State.TIMEOUT and not site.queue_refs()

    wait_for(ended, timeout=30, what="the reconciler to record the global timeout", interval=0.3)

    events = read_events(site.repo, ref)
    assert events[-1][1].kind is EventKind.WORKFLOW
    assert "global_timeout of 1 s exceeded" in events[-1][1].message
    # The reconciler's own event is signed with its key, so it checks as valid too.
    assert site.verifier().verify_ref("wf-timeout", site.repo.rev_parse(ref) or "").invalid is None


class RacingRemote(RemoteRepository):
    """Moves the status ref on the server before the first push, as a second writer would."""

    def __init__(self, site: Site, settings: RemoteSettings, mirror: GitRepo) -> None:
        from tinkops_agent.remote import ssh_command

        super().__init__(mirror, site.url, ssh_command(settings.key, settings.known_hosts))
        self.site = site
        self.pushes = 0
        self.refs_after_rejection: dict[str, str] | None = None

    def push(self, changes: list[RefChange]) -> None:  # type: ignore[override]
        self.pushes += 1
        if self.pushes == 1:
            status = self.site.repo.rev_parse(STATUS_REF)
            tree = self.site.repo.text("mktree", input=b"").strip()
            other = self.site.repo.commit_tree(tree, [], "Another writer\n", AGENT)
            assert self.site.repo.update_ref(STATUS_REF, other, status)
            try:
                super().push(changes)
            except PushRejected:
                self.refs_after_rejection = self.site.repo.refs("refs/tinkops/")
                raise
            raise AssertionError("the push should have lost the race")
        super().push(changes)


def test_push_race_is_retried(site: Site) -> None:
    site.request("wf-race", 120, "true")
    settings = site.settings()
    first = RemoteReconciler(settings)
    first.sync()  # writes the status ref, which the racing writer moves next
    site.request("wf-race-2", 120, "true")
    reconciler = RemoteReconciler(settings)
    racing = RacingRemote(site, settings, reconciler.mirror)
    reconciler.remote = racing

    report = reconciler.sync()

    assert report.attempts == 2
    assert report.created == ("wf-race-2",)
    # The rejected atomic push moved nothing: the new workflow appeared only with the retry.
    assert racing.refs_after_rejection is not None
    assert workflow_ref("wf-race-2") not in racing.refs_after_rejection
    assert site.repo.rev_parse(workflow_ref("wf-race-2")) is not None
    assert read_status(site.repo, "main").reconciled_commit == site.repo.rev_parse(
        "refs/heads/main"
    )


def test_idle_sync_fetches_nothing(site: Site) -> None:
    reconciler = RemoteReconciler(site.settings())
    assert reconciler.sync().fetched == "all"

    report = reconciler.sync()

    assert report.fetched == "nothing"
    assert report.pushed == 0


def test_sync_needs_ssh_url(site: Site) -> None:
    result = tinkops(
        "sync",
        "--remote",
        str(site.path),
        "--key",
        str(site.reconciler_key),
        "--home",
        str(site.home),
        "--once",
        check=False,
    )

    assert result.returncode == 1
    assert "is not ssh://HOST[:PORT]/PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
