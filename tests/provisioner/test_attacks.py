"""Attacks on the provisioner's SSH endpoint, each of which must fail and change nothing.

One real provisioner (``tinkops.provisioner.Provisioner`` on a home made by ``init_home``,
listening on 127.0.0.1) serves the whole module: two machines with their own agent keys, one
workflow shared by both and one for the second machine only. Attacks use stock git and OpenSSH,
and paramiko where a request needs crafting. After each one the test checks that the request
was rejected, that ``git for-each-ref`` of the served repository is unchanged, that a rejected
push left an audit record, and that an operator can still clone.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from tests.conftest import need
from tinkops.audit import AuditRecord, Decision, Stage, read_records
from tinkops.gitops import commit_file
from tinkops.home import ProvisionerConfig, init_home, set_agent_key
from tinkops.identities import generate_ed25519_key, key_fingerprint
from tinkops.limits import MIB, ServerLimits
from tinkops.provisioner import Provisioner
from tinkops.reconciler import read_status
from tinkops.sshconnection import MAX_REJECTED_REQUESTS
from tinkops_agent.eventlog import append_event, new_event_id, read_head, utc_now
from tinkops_agent.gitrepo import ZERO_SHA, GitRepo, Identity, TreeEntry, init_bare
from tinkops_agent.protocol import (
    WORKFLOW_FILE,
    Event,
    EventKind,
    State,
    apply_action_event,
    workflow_ref,
)

WORKER_1 = "08:00:27:00:00:01"
WORKER_2 = "08:00:27:00:00:02"
AGENT = Identity("tinkops agent", "agent@example.test")
# Every subprocess of this module ends within this many seconds, or the test fails.
COMMAND_TIMEOUT = 30

# The provisioner's limits, small enough that the flood and size attacks stay fast.
LIMITS = ServerLimits(
    max_connections=24,
    max_connections_per_key=4,
    max_channels_per_connection=4,
    login_timeout=5.0,
    max_pack_size=1 * MIB,
)

MACHINE_2 = """\
id: machine2
network:
  interfaces:
    - dhcp:
        mac: 08:00:27:00:00:02
        hostname: machine2
        ip:
          address: 192.168.56.44
          netmask: 255.255.255.0
          gateway: 192.168.56.1
      netboot:
        allow_pxe: true
        allow_workflow: true
disks:
  - device: /dev/sda
agent:
  keys: []
"""

TWO_MACHINES = """\
version: "0.1"
name: two-machines
global_timeout: 3600
tasks:
  - name: first
    worker: "{{.device_1}}"
    actions:
      - name: wipe
        image: busybox:latest
        timeout: 3600
  - name: second
    worker: "{{.device_2}}"
    actions:
      - name: install
        image: busybox:latest
        timeout: 3600
"""

ONE_MACHINE = """\
version: "0.1"
name: one-machine
global_timeout: 3600
tasks:
  - name: only
    worker: "{{.device_1}}"
    actions:
      - name: wipe
        image: busybox:latest
        timeout: 3600
"""

SHARED = "shared"  # action 0 runs on worker 1, action 1 on worker 2
SOLO = "solo"  # worker 2 only


@dataclass
class Site:
    """The running provisioner and what attackers and operators use to reach it."""

    provisioner: Provisioner
    home: Path
    repo: GitRepo
    ssh: str
    known_hosts: Path
    keys: dict[str, Path]

    @property
    def port(self) -> int:
        return self.provisioner.server.port

    @property
    def url(self) -> str:
        return self.provisioner.url

    @property
    def audit_log(self) -> Path:
        return self.provisioner.config.audit_log_path

    def fingerprint(self, key: str) -> str:
        return key_fingerprint(paramiko.Ed25519Key.from_private_key_file(str(self.keys[key])))

    def ssh_argv(self, key: str, *options: str) -> list[str]:
        return [
            self.ssh,
            "-F",
            "/dev/null",
            "-i",
            str(self.keys[key]),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
            *options,
        ]

    def ssh_run(self, key: str, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Run the OpenSSH client against the provisioner with ``key``."""
        return subprocess.run(
            [*self.ssh_argv(key), "-p", str(self.port), *arguments],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def git(
        self,
        key: str,
        *args: str,
        cwd: Path | None = None,
        ssh_options: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run stock git with OpenSSH authenticating as ``key``."""
        env = {**os.environ, "GIT_SSH_COMMAND": shlex.join(self.ssh_argv(key, *ssh_options))}
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def refs(self) -> str:
        return self.repo.text("for-each-ref", "--format=%(objectname) %(refname)")

    def audit_records(self) -> list[AuditRecord]:
        return read_records(self.audit_log) if self.audit_log.exists() else []

    def transport(self, key: str | None = "operator") -> paramiko.Transport:
        """Return a paramiko client connection, authenticated with ``key`` unless None."""
        transport = paramiko.Transport(("127.0.0.1", self.port))
        transport.start_client(timeout=10)
        if key is not None:
            private = paramiko.Ed25519Key.from_private_key_file(str(self.keys[key]))
            transport.auth_publickey("git", private)
        return transport

    def fetch_workflow(self, local: GitRepo, workflow_id: str, key: str) -> str:
        """Fetch a workflow's ref over SSH into ``local`` and return its tip."""
        ref = workflow_ref(workflow_id)
        result = self.git(key, "-C", str(local.path), "fetch", self.url, f"+{ref}:{ref}")
        assert result.returncode == 0, result.stderr
        tip = local.rev_parse(ref)
        assert tip is not None
        return tip


def render_site(home: Path) -> dict[str, Path]:
    """Create the provisioner home with a second machine, two templates and two requests."""
    init_home(home, include_requests=False, port=0)
    keys = {
        "operator": home / "keys" / "operator",
        "worker-1": home / "keys" / "agent-machine1",
        "worker-2": home / "keys" / "agent-machine2",
        "stranger": home / "keys" / "stranger",
    }
    worker_2 = generate_ed25519_key(keys["worker-2"], "tinkops-agent@machine2")
    generate_ed25519_key(keys["stranger"], "stranger@example.test")

    repo = GitRepo(home / "repository.git")
    files = {
        "hardware/machine2.yaml": set_agent_key(MACHINE_2, worker_2),
        "templates/two-machines.yaml": TWO_MACHINES,
        "templates/one-machine.yaml": ONE_MACHINE,
        f"workflows/{SHARED}.yaml": (
            "template: two-machines\n"
            f"hardware_map:\n  device_1: {WORKER_1}\n  device_2: {WORKER_2}\n"
        ),
        f"workflows/{SOLO}.yaml": f"template: one-machine\nhardware_map:\n  device_1: {WORKER_2}\n",
    }
    for path, content in files.items():
        commit_file(repo, path, content.encode(), f"Add {path}\n")

    config = ProvisionerConfig.load(home)
    config.limits = LIMITS
    config.save()
    return keys


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    ssh = find_ssh()
    home = tmp_path_factory.mktemp("attacks") / "provisioner"
    # The module fixture runs before the per-test environment fixture, so it scrubs the same
    # variables itself: nothing of a developer's git or ssh setup may leak in.
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("GIT_", "SSH_", "TINKOPS_")):
            del os.environ[name]
    os.environ.update(
        HOME=str(tmp_path_factory.mktemp("home")),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Test Operator",
        GIT_AUTHOR_EMAIL="operator@example.test",
        GIT_COMMITTER_NAME="Test Operator",
        GIT_COMMITTER_EMAIL="operator@example.test",
    )
    try:
        keys = render_site(home)
        provisioner = Provisioner(ProvisionerConfig.load(home))
        provisioner.start()
        try:
            repo = GitRepo(home / "repository.git")
            wait_until_reconciled(repo)
            known_hosts = home / "known_hosts"
            known_hosts.write_text(
                f"[127.0.0.1]:{provisioner.server.port} {provisioner.host_key_line}\n"
            )
            yield Site(provisioner, home, repo, ssh, known_hosts, keys)
        finally:
            provisioner.stop()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def wait_until_reconciled(repo: GitRepo) -> None:
    """Wait until the reconciler rendered both workflows and recorded the main branch's tip,
    after which it writes no ref until main moves."""
    deadline = time.monotonic() + 30
    while True:
        rendered = len(repo.refs("refs/tinkops/workflows/")) == 2
        reconciled = read_status(repo, "main").reconciled_commit
        if rendered and reconciled == repo.rev_parse("refs/heads/main"):
            return
        assert time.monotonic() < deadline, "the reconciler did not render the workflows"
        time.sleep(0.05)


def find_ssh() -> str:
    found = shutil.which("ssh")
    if found is None:
        need("the OpenSSH client (ssh) is not installed")
        raise AssertionError("unreachable")
    return found


# --- checks every attack ends with ----------------------------------------------------------


def assert_still_serving(site: Site, target: Path) -> None:
    """An operator can still clone, and the clone contains the main branch."""
    result = site.git("operator", "clone", "--quiet", site.url, str(target))
    assert result.returncode == 0, result.stderr
    assert (target / "hardware" / "machine2.yaml").is_file()


def assert_push_rejected(
    site: Site,
    result: subprocess.CompletedProcess[str],
    *,
    refs_before: str,
    audits_before: int,
    key: str,
    ref: str,
    reason: str,
    stage: Stage = Stage.POLICY,
) -> AuditRecord:
    """The push failed, moved no ref, and left one audit record that explains it."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert site.refs() == refs_before

    records = site.audit_records()
    assert len(records) == audits_before + 1
    record = records[-1]
    assert record.decision is Decision.REJECTED
    assert record.stage is stage
    assert record.fingerprint == site.fingerprint(key)
    assert record.remote_address.startswith("127.0.0.1:")
    assert ref in [change.ref for change in record.refs]
    assert any(reason in text for text in record.reasons), record.reasons
    return record


# --- helpers that write what a worker would push ---------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> GitRepo:
    return init_bare(tmp_path / "local.git", "main")


def event_commit(
    local: GitRepo,
    parent: str,
    index: int,
    worker: str,
    *,
    ephemeral: dict[str, bytes] | None = None,
) -> str:
    """Write the commit an agent writes when action ``index`` starts, as the agent's code does.

    The event is dated now: the reconciler ends a workflow whose timeouts have passed.
    """
    head = read_head(local, parent)
    now = utc_now()
    status = apply_action_event(head.status, index, State.RUNNING, at=now)
    task, action = head.workflow.flat_actions()[index]
    event = Event(
        kind=EventKind.ACTION,
        workflow=head.workflow.id,
        workflow_state=status.state,
        worker=worker,
        message="started",
        event_id=new_event_id(),
        created_at=now,
        task=task.name,
        action=action.name,
        action_index=index,
        action_state=State.RUNNING,
    )
    return append_event(local, parent, status, event, AGENT, ephemeral)


def operator_clone(site: Site, target: Path) -> Path:
    result = site.git("operator", "clone", "--quiet", site.url, str(target))
    assert result.returncode == 0, result.stderr
    return target


def commit_in(clone: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(clone), *args], check=True, capture_output=True)


# --- authentication -------------------------------------------------------------------------


def test_unknown_key_rejected(site: Site, tmp_path: Path) -> None:
    before = site.refs()

    result = site.git("stranger", "clone", site.url, str(tmp_path / "stolen"))

    assert result.returncode != 0
    assert "Permission denied (publickey)" in result.stderr
    assert not (tmp_path / "stolen").exists()
    assert site.refs() == before
    assert_still_serving(site, tmp_path / "after")


def test_unknown_keys_end_connection(site: Site, tmp_path: Path) -> None:
    transport = site.transport(key=None)
    try:
        for index in range(LIMITS.max_auth_attempts + 2):
            key = paramiko.Ed25519Key.from_private_key_file(str(site.keys["stranger"]))
            with pytest.raises(paramiko.SSHException):
                transport.auth_publickey(f"guess-{index}", key)
            if not transport.is_active():
                break
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)

        assert not transport.is_authenticated()
        assert not transport.is_active()
    finally:
        transport.close()
    assert_still_serving(site, tmp_path / "after")


def test_password_and_interactive_rejected(site: Site, tmp_path: Path) -> None:
    transport = site.transport(key=None)
    try:
        with pytest.raises(paramiko.BadAuthenticationType) as password:
            transport.auth_password("git", "hunter2")
        assert password.value.allowed_types == ["publickey"]
        with pytest.raises(paramiko.BadAuthenticationType):
            transport.auth_interactive("git", lambda title, instructions, prompts: [])
        with pytest.raises(paramiko.BadAuthenticationType):
            transport.auth_none("git")
        assert not transport.is_authenticated()
    finally:
        transport.close()

    result = site.ssh_run(
        "operator",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password,keyboard-interactive",
        "git@127.0.0.1",
        "git-upload-pack 'tinkops.git'",
    )
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr
    assert_still_serving(site, tmp_path / "after")


# --- everything but git is rejected ---------------------------------------------------------


def test_shell_and_pty_rejected(site: Site, tmp_path: Path) -> None:
    with_pty = site.ssh_run("worker-1", "-tt", "git@127.0.0.1")
    shell = site.ssh_run("worker-1", "-T", "git@127.0.0.1")

    assert with_pty.returncode == 255
    assert "PTY allocation request failed" in with_pty.stderr
    assert shell.returncode == 255
    assert "shell request failed" in shell.stderr

    transport = site.transport("worker-1")
    try:
        channel = transport.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):
            channel.get_pty()
        with pytest.raises(paramiko.SSHException):
            channel.invoke_shell()
        channel.close()
        channel = transport.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):
            channel.invoke_subsystem("sftp")
        channel.close()
    finally:
        transport.close()
    assert_still_serving(site, tmp_path / "after")


def test_forwarding_rejected(site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    remote = site.ssh_run(
        "worker-1", "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9", "git@127.0.0.1"
    )
    local = site.ssh_run("worker-1", "-W", f"127.0.0.1:{site.port}", "git@127.0.0.1")

    assert remote.returncode == 255
    assert "remote port forwarding failed" in remote.stderr
    assert local.returncode == 255
    assert "administratively prohibited" in local.stderr

    transport = site.transport("worker-1")
    try:
        channel = transport.open_session(timeout=10)
        channel.request_forward_agent(lambda agent_channel: None)
        with pytest.raises(paramiko.SSHException):
            channel.request_x11(handler=lambda x11_channel, origin: None)
        channel.close()
    finally:
        transport.close()

    messages = [record.getMessage() for record in caplog.records]
    for rejected in ("remote port forwarding", "port forwarding (to", "agent forwarding", "X11"):
        assert any(f"rejected {rejected}" in message for message in messages), rejected
    assert_still_serving(site, tmp_path / "after")


def test_env_injection_rejected(
    site: Site, tmp_path: Path, local: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    before = site.refs()
    audits = len(site.audit_records())
    tip = site.fetch_workflow(local, SHARED, "worker-1")
    commit = event_commit(local, tip, 0, WORKER_1)
    # A worker that claims to be an operator and turns the hook off, pushing to main.
    injected = (
        "-o",
        "SetEnv=TINKOPS_ROLE=operator TINKOPS_PRINCIPAL=operator "
        "GIT_CONFIG_PARAMETERS='core.hooksPath'='/dev/null' LD_PRELOAD=/tmp/evil.so",
    )

    result = site.git(
        "worker-1",
        "-C",
        str(local.path),
        "push",
        "--force",
        site.url,
        f"{commit}:refs/heads/main",
        ssh_options=injected,
    )

    record = assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="worker-1",
        ref="refs/heads/main",
        reason="workers may push only to refs/tinkops/workflows/<id>",
    )
    assert record.role == "worker"
    assert record.principal == "machine1"
    messages = [record.getMessage() for record in caplog.records]
    for name in ("TINKOPS_ROLE", "TINKOPS_PRINCIPAL", "GIT_CONFIG_PARAMETERS", "LD_PRELOAD"):
        assert any(f"environment variable '{name}'" in message for message in messages), name
    assert_still_serving(site, tmp_path / "after")


def test_env_flood_closes_connection(site: Site, tmp_path: Path) -> None:
    transport = site.transport("worker-1")
    try:
        channel = transport.open_session(timeout=10)
        # paramiko sends env requests without waiting for a reply, so this is a fast flood.
        for index in range(200):
            if not transport.is_active():
                break
            channel.set_environment_variable("GIT_PROTOCOL", f"version=2:flood{index}")
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)

        assert not transport.is_active()
    finally:
        transport.close()
    assert_still_serving(site, tmp_path / "after")


def exec_command(
    transport: paramiko.Transport, command: bytes, stdin: bytes = b""
) -> tuple[int, bytes]:
    """Run ``command`` on a new channel, send ``stdin`` and EOF, and return the exit status
    and stderr."""
    channel = transport.open_session(timeout=10)
    try:
        channel.exec_command(command)
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()
        stderr = channel.makefile_stderr("rb").read()
        return channel.recv_exit_status(), stderr
    finally:
        channel.close()


# Commands a client may send in an exec request; MARKER is replaced by a file path that must
# never be created.
INJECTED_COMMANDS = [
    b"sh -c id",
    b"git-upload-archive 'tinkops.git'",
    b"git upload-archive 'tinkops.git'",
    b"git-upload-pack '../tinkops.git'",
    b"git-upload-pack '/../../etc/passwd'",
    b"git-upload-pack '/proc/self/cwd'",
    b"git-receive-pack '~root/tinkops.git'",
    b"git-upload-pack -- 'tinkops.git'",
    b"git-upload-pack --help",
    b"git-upload-pack '--upload-pack=touch MARKER'",
    b"git --exec-path=/tmp upload-pack 'tinkops.git'",
    b"git -c core.sshCommand=id upload-pack 'tinkops.git'",
    b"git-upload-pack 'tinkops.git'; touch MARKER",
    b"git-upload-pack 'tinkops.git' && touch MARKER",
    b"git-upload-pack '$(touch MARKER)'",
    b"git-upload-pack `touch MARKER`",
    b"git-upload-pack 'tinkops.git' | sh",
    b"git-upload-pack 'tinkops.git'\ntouch MARKER",
    b"git-upload-pack 'tinkops.git'\0touch MARKER",
    b"git-upload-pack 'tinkops.git\\'",
    # Overlong UTF-8 for "/", a fullwidth "t", and a right-to-left override.
    b"git-upload-pack '\xc0\xaftinkops.git'",
    "git-upload-pack '\uff54inkops.git'".encode(),
    "git-upload-pack '\u202etinkops.git'".encode(),
    b"git-upload-pack '" + b"a" * 5000 + b"'",
]


def test_exec_injection_rejected(site: Site, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    before = site.refs()

    # One connection sends every command, each on its own channel: fewer handshakes keep the
    # table fast, and the connection stays under the limit of rejected requests.
    assert len(INJECTED_COMMANDS) < MAX_REJECTED_REQUESTS
    transport = site.transport("worker-1")
    try:
        for template in INJECTED_COMMANDS:
            command = template.replace(b"MARKER", str(marker).encode())
            status, stderr = exec_command(transport, command)

            assert status == 1, command
            assert stderr.startswith(b"tinkops: "), command
            assert b"serves only git fetch and push" in stderr, command
            assert not marker.exists(), command
            assert site.refs() == before, command
    finally:
        transport.close()
    assert_still_serving(site, tmp_path / "after")


def test_git_client_path_tricks_rejected(site: Site, tmp_path: Path) -> None:
    port = site.port
    marker = tmp_path / "marker"
    attempts = [
        ("ls-remote", f"ssh://git@127.0.0.1:{port}/../../etc/passwd"),
        ("ls-remote", f"ssh://git@127.0.0.1:{port}/tinkops.git;touch {marker}"),
        ("ls-remote", f"ssh://git@127.0.0.1:{port}/tinkops.git'; touch {marker}; '"),
        ("ls-remote", f"--upload-pack=touch {marker}; git-upload-pack", site.url),
        ("archive", f"--remote={site.url}", "HEAD"),
    ]
    for attempt in attempts:
        result = site.git("operator", *attempt)

        assert result.returncode != 0, attempt
        assert "tinkops: " in result.stderr, attempt
    assert not marker.exists()
    assert_still_serving(site, tmp_path / "after")


def test_second_exec_on_channel_rejected(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    transport = site.transport("worker-1")
    try:
        channel = transport.open_session(timeout=10)
        channel.exec_command("git-upload-pack 'tinkops.git'")
        # Protocol v0 upload-pack advertises its refs, then waits for the client.
        assert channel.recv(4)

        # paramiko's client closes its own channel after a failed request.
        with pytest.raises(paramiko.SSHException):
            channel.exec_command("git-receive-pack 'tinkops.git'")

        # The connection still serves a new channel.
        status, _stderr = exec_command(transport, b"git-upload-pack 'tinkops.git'", b"0000")
        assert status == 0
    finally:
        transport.close()

    messages = [record.getMessage() for record in caplog.records]
    assert any("rejected second exec on channel" in message for message in messages)
    assert not any("runs git receive-pack" in message for message in messages)
    assert_still_serving(site, tmp_path / "after")


def test_channels_per_connection_bounded(site: Site, tmp_path: Path) -> None:
    transport = site.transport("worker-1")
    try:
        channels = [
            transport.open_session(timeout=10) for _ in range(LIMITS.max_channels_per_connection)
        ]
        with pytest.raises(paramiko.ChannelException) as crowded:
            transport.open_session(timeout=10)
        assert crowded.value.code == paramiko.common.OPEN_FAILED_RESOURCE_SHORTAGE

        for channel in channels:
            channel.close()
        # Closed channels free their places once the server has seen them close.
        deadline = time.monotonic() + 5
        while True:
            try:
                transport.open_session(timeout=10).close()
                break
            except paramiko.ChannelException:
                assert time.monotonic() < deadline, "closed channels were never released"
                time.sleep(0.1)
    finally:
        transport.close()
    assert_still_serving(site, tmp_path / "after")


def test_connections_per_key_bounded(site: Site, tmp_path: Path) -> None:
    transports = [site.transport("worker-2") for _ in range(LIMITS.max_connections_per_key)]
    try:
        for transport in transports:
            transport.open_session(timeout=10).close()
        extra = site.transport("worker-2")
        transports.append(extra)

        with pytest.raises((paramiko.ChannelException, paramiko.SSHException, EOFError)):
            extra.open_session(timeout=10)
        deadline = time.monotonic() + 5
        while extra.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not extra.is_active()
        # Another key is not affected.
        other = site.git("worker-1", "ls-remote", site.url, "refs/heads/main")
        assert other.returncode == 0, other.stderr
    finally:
        for transport in transports:
            transport.close()
    assert_still_serving(site, tmp_path / "after")


def test_connection_flood_bounded(site: Site, tmp_path: Path) -> None:
    flood = 100
    started = time.monotonic()
    # First, hold 100 connections open at once: the server keeps at most max_connections and
    # closes the rest without a word.
    sockets = [socket.create_connection(("127.0.0.1", site.port), timeout=5) for _ in range(flood)]
    try:
        greeted = 0
        for sock in sockets:
            sock.settimeout(5)
            try:
                banner = sock.recv(64)
            except (ConnectionResetError, TimeoutError):
                banner = b""
            if banner.startswith(b"SSH-2.0-"):
                greeted += 1
        assert 0 < greeted <= LIMITS.max_connections
    finally:
        for sock in sockets:
            sock.close()

    # Then open and drop connections in a loop, with garbage for a banner.
    for _ in range(flood):
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert time.monotonic() - started < 20

    # The dropped connections free their places within moments.
    deadline = time.monotonic() + 10
    while site.provisioner.server.open_connections > 0:
        assert time.monotonic() < deadline, "flooded connections stayed open"
        time.sleep(0.05)
    assert_still_serving(site, tmp_path / "after")


# --- pushes the policy rejects --------------------------------------------------------------


def test_worker_push_to_other_workers_workflow(site: Site, tmp_path: Path, local: GitRepo) -> None:
    tip = site.fetch_workflow(local, SOLO, "worker-1")
    # Worker 1 writes the event worker 2 would write, and pushes it with its own key.
    commit = event_commit(local, tip, 0, WORKER_2)
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(
        "worker-1", "-C", str(local.path), "push", site.url, f"{commit}:{workflow_ref(SOLO)}"
    )

    assert "tinkops: rejected refs/tinkops/workflows/solo" in result.stderr
    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="worker-1",
        ref=workflow_ref(SOLO),
        reason=f"workflow {SOLO} has no task for {WORKER_1}",
    )
    assert_still_serving(site, tmp_path / "after")


def test_worker_push_to_main(site: Site, tmp_path: Path, local: GitRepo) -> None:
    tip = site.fetch_workflow(local, SHARED, "worker-1")
    commit = event_commit(local, tip, 0, WORKER_1)
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(
        "worker-1", "-C", str(local.path), "push", "--force", site.url, f"{commit}:refs/heads/main"
    )

    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="worker-1",
        ref="refs/heads/main",
        reason="workers may push only to refs/tinkops/workflows/<id>",
    )
    assert_still_serving(site, tmp_path / "after")


def test_operator_force_push_main(site: Site, tmp_path: Path) -> None:
    clone = operator_clone(site, tmp_path / "clone")
    commit_in(clone, "checkout", "--quiet", "--orphan", "rewritten")
    commit_in(clone, "commit", "--quiet", "-m", "Rewrite history")
    before, audits = site.refs(), len(site.audit_records())

    result = site.git("operator", "-C", str(clone), "push", "--force", "origin", "HEAD:main")

    assert "moves only by fast-forward" in result.stderr
    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="operator",
        ref="refs/heads/main",
        reason="refs/heads/main moves only by fast-forward",
    )
    assert_still_serving(site, tmp_path / "after")


@pytest.mark.parametrize(
    ("key", "ref", "reason"),
    [
        ("worker-1", workflow_ref(SHARED), "workers cannot delete workflow refs"),
        ("worker-1", "refs/heads/main", "workers may push only to"),
        ("operator", "refs/heads/main", "cannot be deleted"),
        ("operator", workflow_ref(SOLO), "refs/tinkops/ is written only by the provisioner"),
        ("operator", "refs/tinkops/status", "refs/tinkops/ is written only by the provisioner"),
    ],
)
def test_ref_deletion_rejected(
    site: Site, tmp_path: Path, local: GitRepo, key: str, ref: str, reason: str
) -> None:
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(key, "-C", str(local.path), "push", site.url, f":{ref}")

    record = assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key=key,
        ref=ref,
        reason=reason,
    )
    assert record.refs[0].new == ZERO_SHA
    assert_still_serving(site, tmp_path / "after")


def test_worker_modifies_rendered_workflow(site: Site, tmp_path: Path, local: GitRepo) -> None:
    tip = site.fetch_workflow(local, SHARED, "worker-1")
    event = event_commit(local, tip, 0, WORKER_1)
    definition = local.read_file(event, WORKFLOW_FILE)
    assert definition is not None
    tampered_blob = local.write_blob(definition.replace(b"busybox:latest", b"evil:latest"))
    root = local.write_root(event, {WORKFLOW_FILE: TreeEntry("100644", "blob", tampered_blob)})
    message = local.text("log", "-1", "--format=%B", event)
    tampered = local.commit_tree(root, [tip], message, AGENT)
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(
        "worker-1", "-C", str(local.path), "push", site.url, f"{tampered}:{workflow_ref(SHARED)}"
    )

    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="worker-1",
        ref=workflow_ref(SHARED),
        reason="changes workflow.yaml, which is immutable once rendered",
    )
    assert_still_serving(site, tmp_path / "after")


def test_operator_modifies_rendered_workflow(site: Site, tmp_path: Path, local: GitRepo) -> None:
    tip = site.fetch_workflow(local, SHARED, "operator")
    root = local.write_root(
        tip, {WORKFLOW_FILE: TreeEntry("100644", "blob", local.write_blob(b""))}
    )
    tampered = local.commit_tree(root, [tip], "Empty the workflow\n", AGENT)
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(
        "operator", "-C", str(local.path), "push", site.url, f"{tampered}:{workflow_ref(SHARED)}"
    )

    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="operator",
        ref=workflow_ref(SHARED),
        reason="refs/tinkops/ is written only by the provisioner and its workers",
    )
    assert_still_serving(site, tmp_path / "after")


def test_worker_forges_other_workers_event(site: Site, tmp_path: Path, local: GitRepo) -> None:
    tip = site.fetch_workflow(local, SHARED, "worker-1")
    # Action 1 runs on worker 2; worker 1 reports it in worker 2's name.
    forged = event_commit(local, tip, 1, WORKER_2)
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(
        "worker-1", "-C", str(local.path), "push", site.url, f"{forged}:{workflow_ref(SHARED)}"
    )

    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="worker-1",
        ref=workflow_ref(SHARED),
        reason=f"has Worker: '{WORKER_2}', but this key acts only as {WORKER_1}",
    )
    assert_still_serving(site, tmp_path / "after")


def test_worker_creates_refs(site: Site, tmp_path: Path, local: GitRepo) -> None:
    tip = site.fetch_workflow(local, SHARED, "worker-1")
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(
        "worker-1",
        "-C",
        str(local.path),
        "push",
        site.url,
        f"{tip}:{workflow_ref('invented')}",
        f"{tip}:refs/tags/v1",
    )

    record = assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="worker-1",
        ref=workflow_ref("invented"),
        reason="workers cannot create workflow refs",
    )
    assert any("refs/tags/v1" in reason for reason in record.reasons)
    assert_still_serving(site, tmp_path / "after")


def test_ephemeral_over_limit(site: Site, tmp_path: Path, local: GitRepo) -> None:
    tip = site.fetch_workflow(local, SHARED, "worker-1")
    # Zeros compress to almost nothing, so the pack stays under max_pack_size and the policy,
    # which counts the files' sizes, rejects the push.
    commit = event_commit(local, tip, 0, WORKER_1, ephemeral={"disk.img": bytes(10 * MIB + 1)})
    before, audits = site.refs(), len(site.audit_records())

    result = site.git(
        "worker-1", "-C", str(local.path), "push", site.url, f"{commit}:{workflow_ref(SHARED)}"
    )

    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="worker-1",
        ref=workflow_ref(SHARED),
        reason="over the limit of 10485760 bytes",
    )
    assert site.repo.execute("cat-file", "-e", commit).returncode != 0
    assert_still_serving(site, tmp_path / "after")


def test_pack_over_limit(site: Site, tmp_path: Path) -> None:
    clone = operator_clone(site, tmp_path / "clone")
    # Random bytes do not compress, so the pack is about 2 MiB, over the 1 MiB limit.
    (clone / "firmware.bin").write_bytes(os.urandom(2 * MIB))
    commit_in(clone, "add", "firmware.bin")
    commit_in(clone, "commit", "--quiet", "-m", "Add firmware")
    blob = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD:firmware.bin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    before, audits = site.refs(), len(site.audit_records())

    # Operators may push any branch but main freely: only the size limit stops this one.
    result = site.git("operator", "-C", str(clone), "push", "origin", "HEAD:refs/heads/big")

    assert "pack exceeds maximum allowed size" in result.stderr
    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="operator",
        ref="refs/heads/big",
        reason="pack exceeds maximum allowed size",
        stage=Stage.RECEIVE_PACK,
    )
    assert site.repo.execute("cat-file", "-e", blob).returncode != 0
    assert_still_serving(site, tmp_path / "after")


def test_malformed_tree_rejected(site: Site, tmp_path: Path, local: GitRepo) -> None:
    main = site.repo.rev_parse("refs/heads/main")
    assert main is not None
    result = site.git("operator", "-C", str(local.path), "fetch", site.url, "main")
    assert result.returncode == 0, result.stderr
    # A tree entry named ".git" would let a checkout write into the clone's own git folder.
    blob = local.write_blob(b"[core]\n\tfsmonitor = touch /tmp/pwned\n")
    inner = local.text("mktree", input=f"100644 blob {blob}\tconfig\n".encode()).strip()
    tree = local.text("mktree", input=f"040000 tree {inner}\t.git\n".encode()).strip()
    commit = local.commit_tree(tree, [main], "Sneak in a .git folder\n", AGENT)
    before, audits = site.refs(), len(site.audit_records())

    result = site.git("operator", "-C", str(local.path), "push", site.url, f"{commit}:refs/heads/x")

    assert_push_rejected(
        site,
        result,
        refs_before=before,
        audits_before=audits,
        key="operator",
        ref="refs/heads/x",
        reason="rejected push: ",
        stage=Stage.RECEIVE_PACK,
    )
    assert_still_serving(site, tmp_path / "after")


# --- the policy still lets the legitimate pushes through ------------------------------------


def test_worker_own_event_accepted_and_audited(
    site: Site, tmp_path: Path, local: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops.audit")
    tip = site.fetch_workflow(local, SHARED, "worker-1")
    commit = event_commit(local, tip, 0, WORKER_1)
    audits = len(site.audit_records())

    result = site.git(
        "worker-1", "-C", str(local.path), "push", site.url, f"{commit}:{workflow_ref(SHARED)}"
    )

    assert result.returncode == 0, result.stderr
    assert site.repo.rev_parse(workflow_ref(SHARED)) == commit
    records = site.audit_records()
    assert len(records) == audits + 1
    assert records[-1].decision is Decision.ACCEPTED
    assert records[-1].principal == "machine1"
    assert records[-1].worker_ids == (WORKER_1,)
    assert records[-1].refs[0].new == commit
    lines = [r.getMessage() for r in caplog.records if r.name == "tinkops.audit"]
    assert any(
        line.startswith("push accepted stage=policy role=worker principal=machine1")
        and workflow_ref(SHARED) in line
        for line in lines
    ), lines
