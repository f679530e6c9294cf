"""The embedded SSH server against stock git, the OpenSSH client and paramiko clients.

Every test runs a real server on 127.0.0.1 (port 0) over a real bare repository, with the
pre-receive hook installed, so pushes go through the whole path: SSH, receive-pack, the hook
in quarantine, and the push policy.
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
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

from tests.conftest import need
from tinkops.gitsession import CommandRejected, GitService, RefCommandReader, parse_git_command
from tinkops.identities import (
    Principal,
    Role,
    StaticKeyDirectory,
    generate_ed25519_key,
    key_fingerprint,
)
from tinkops.limits import ServerLimits
from tinkops.prereceive import HookSettings
from tinkops.sshserver import GitSSHServer
from tinkops.workflows import write_workflow_commit
from tinkops_agent.eventlog import append_event
from tinkops_agent.gitrepo import GitRepo, Identity, TreeEntry, init_bare
from tinkops_agent.protocol import (
    WORKFLOW_FILE,
    Action,
    Event,
    EventKind,
    State,
    Task,
    Workflow,
    WorkflowStatus,
    apply_action_event,
    workflow_ref,
)

WORKER_A = "08:00:27:00:00:01"
WORKER_B = "08:00:27:00:00:02"
AGENT = Identity("tinkops agent", "agent@example.test")
AT = "2024-05-01T12:00:00Z"


@dataclass
class Keys:
    folder: Path
    public: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.folder / name


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    result = Keys(folder)
    for name in ("host", "operator", "worker-a", "worker-b", "stranger"):
        result.public[name] = generate_ed25519_key(folder / name, f"{name}@test")
    return result


def workflow(workflow_id: str, *workers: str) -> Workflow:
    tasks = tuple(
        Task(
            name=f"task-{index}",
            worker=worker,
            actions=(
                Action(name="wipe", image="busybox", timeout=60),
                Action(name="install", image="busybox", timeout=60),
            ),
        )
        for index, worker in enumerate(workers)
    )
    return Workflow(id=workflow_id, template="demo", tasks=tasks, request=f"{workflow_id}.yaml")


@dataclass
class Served:
    """A running server, its repository and what a client needs to reach it."""

    server: GitSSHServer
    repo: GitRepo
    keys: Keys
    ssh: str
    known_hosts: Path
    pushes: list[Principal]
    main: str

    @property
    def url(self) -> str:
        return f"ssh://git@127.0.0.1:{self.server.port}/tinkops.git"

    def git_env(self, key: str, **extra: str) -> dict[str, str]:
        command = [
            self.ssh,
            "-F",
            "none",
            "-i",
            str(self.keys.path(key)),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
        ]
        return {**os.environ, "GIT_SSH_COMMAND": shlex.join(command), **extra}

    def git(
        self, key: str, *args: str, cwd: Path | None = None, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=self.git_env(key, **extra),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def paramiko_client(self, key: str | None = "operator") -> paramiko.Transport:
        transport = paramiko.Transport(("127.0.0.1", self.server.port))
        transport.start_client(timeout=10)
        host_key = paramiko.Ed25519Key.from_private_key_file(str(self.keys.path("host")))
        assert transport.get_remote_server_key() == host_key
        if key is not None:
            private = paramiko.Ed25519Key.from_private_key_file(str(self.keys.path(key)))
            transport.auth_publickey("git", private)
        return transport


@pytest.fixture
def served(
    tmp_path: Path, keys: Keys, openssh_client: str, request: pytest.FixtureRequest
) -> Iterator[Served]:
    repo = init_bare(tmp_path / "tinkops.git", "main")
    tree = repo.write_tree({"README.md": b"infrastructure\n"})
    main = repo.commit_tree(tree, [], "Start\n", AGENT)
    repo.update_ref("refs/heads/main", main, None)
    for definition in (workflow("wf-a", WORKER_A, WORKER_B), workflow("wf-b", WORKER_B)):
        first = write_workflow_commit(repo, definition)
        repo.update_ref(workflow_ref(definition.id), first, None)

    directory = StaticKeyDirectory(
        [
            (Principal(Role.OPERATOR, "alice", ""), keys.public["operator"]),
            (Principal(Role.WORKER, "node-a", "", (WORKER_A,)), keys.public["worker-a"]),
            (Principal(Role.WORKER, "node-b", "", (WORKER_B,)), keys.public["worker-b"]),
        ]
    )
    host_key = paramiko.Ed25519Key.from_private_key_file(str(keys.path("host")))
    pushes: list[Principal] = []
    options = getattr(request, "param", {})
    server = GitSSHServer(repo.path, host_key, directory, on_push=pushes.append, **options)
    server.start()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{server.port} {keys.public['host']}\n")
    try:
        yield Served(server, repo, keys, openssh_client, known_hosts, pushes, main)
    finally:
        server.stop()


def clone(served: Served, key: str, target: Path, *args: str) -> None:
    result = served.git(key, "clone", *args, served.url, str(target))
    assert result.returncode == 0, result.stderr


def worker_event(served: Served, local: GitRepo, workflow_id: str, worker: str, index: int) -> str:
    """Fetch a workflow over SSH into ``local`` and write one event commit on its tip."""
    key = "worker-a" if worker == WORKER_A else "worker-b"
    ref = workflow_ref(workflow_id)
    result = served.git(key, "-C", str(local.path), "fetch", served.url, f"+{ref}:{ref}")
    assert result.returncode == 0, result.stderr
    tip = local.rev_parse(ref)
    assert tip is not None
    definition = workflow(workflow_id, WORKER_A, WORKER_B)
    status = WorkflowStatus.from_json(local.read_file(tip, "state.json") or b"")
    status = apply_action_event(status, index, State.RUNNING, at=AT)
    task, action = definition.flat_actions()[index]
    event = Event(
        kind=EventKind.ACTION,
        workflow=workflow_id,
        workflow_state=status.state,
        worker=worker,
        message="started",
        event_id=f"event-{index}",
        created_at=AT,
        task=task.name,
        action=action.name,
        action_index=index,
        action_state=State.RUNNING,
    )
    return append_event(local, tip, status, event, AGENT)


@pytest.fixture
def agent_repo(tmp_path: Path) -> GitRepo:
    return init_bare(tmp_path / "agent.git", "main")


# --- command parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "service"),
    [
        ("git-upload-pack '/tinkops.git'", GitService.UPLOAD_PACK),
        ("git-upload-pack 'tinkops.git'", GitService.UPLOAD_PACK),
        ("git-receive-pack '/tinkops'", GitService.RECEIVE_PACK),
        ("git upload-pack '~/tinkops.git'", GitService.UPLOAD_PACK),
        ('git receive-pack "tinkops.git"', GitService.RECEIVE_PACK),
    ],
)
def test_parse_command_accepts_git_forms(command: str, service: GitService) -> None:
    assert parse_git_command(command.encode(), "tinkops.git") is service


@pytest.mark.parametrize(
    "command",
    [
        "",
        "ls",
        "sh -c id",
        "git-upload-archive 'tinkops.git'",
        "git-upload-pack",
        "git-upload-pack 'tinkops.git' 'other.git'",
        "git-upload-pack --strict 'tinkops.git'",
        "git-upload-pack '../tinkops.git'",
        "git-upload-pack '/srv/../tinkops.git'",
        "git-upload-pack '//tinkops.git'",
        "git-upload-pack '/etc/passwd'",
        "git-upload-pack 'tinkops.git'; id",
        "git-upload-pack 'tinkops.git' && id",
        "git-upload-pack '$(id)'",
        "git-upload-pack `id`",
        "git-upload-pack 'tinkops.git' | sh",
        "git-upload-pack 'tinkops.git' > /tmp/out",
        "git-upload-pack 'tinkops.git\nid'",
        "git-upload-pack 'tinkops.git'\0",
        "git-upload-pack 'tinkops.git",
        "git-upload-pack tinkops.git\\ x",
        "git-upload-pack -- 'tinkops.git'",
        "git -- upload-pack 'tinkops.git'",
        "git-upload-pack --help",
        "git --exec-path=/tmp upload-pack 'tinkops.git'",
        "git-upload-pack '/./tinkops.git'",
        "git-upload-pack '~root/tinkops.git'",
        "git-upload-pack '\uff54inkops.git'",
        "git\u2010upload-pack 'tinkops.git'",
        "git-upload-pack 'tinkops.git' # comment",
        "git-upload-pack\t'tinkops.git'",
        "git-upload-pack '" + "a" * 1100 + "'",
    ],
)
def test_parse_command_rejects(command: str) -> None:
    with pytest.raises(CommandRejected):
        parse_git_command(command.encode(), "tinkops.git")


def test_parse_command_rejects_non_utf8() -> None:
    with pytest.raises(CommandRejected, match="UTF-8"):
        parse_git_command(b"git-upload-pack '\xff'", "tinkops.git")
    # An overlong encoding of "/" is not UTF-8 either.
    with pytest.raises(CommandRejected, match="UTF-8"):
        parse_git_command(b"git-upload-pack '\xc0\xaftinkops.git'", "tinkops.git")


def pkt_line(text: bytes) -> bytes:
    return f"{len(text) + 4:04x}".encode() + text


def test_ref_command_reader_reads_push_commands() -> None:
    old, new = "a" * 40, "b" * 40
    stream = (
        pkt_line(f"shallow {'c' * 40}\n".encode())
        + pkt_line(f"{old} {new} refs/heads/main\0report-status side-band-64k\n".encode())
        + pkt_line(f"{new} {'0' * 40} refs/heads/old\n".encode())
        + b"0000"
        + b"PACK\x00\x00\x00\x02"
    )
    reader = RefCommandReader()

    # The client's stream arrives in pieces of any size.
    for start in range(0, len(stream), 7):
        reader.feed(stream[start : start + 7])

    assert reader.complete
    assert reader.updates == [
        (old, new, "refs/heads/main"),
        (new, "0" * 40, "refs/heads/old"),
    ]


@pytest.mark.parametrize(
    "stream",
    [b"zzzz", b"0003", pkt_line(b"push-cert\0caps\n") + b"0000"],
)
def test_ref_command_reader_stops_at_unexpected_data(stream: bytes) -> None:
    reader = RefCommandReader()

    reader.feed(stream)

    assert not reader.complete
    assert reader.updates == []


def test_ref_command_reader_bounded() -> None:
    line = pkt_line(f"{'a' * 40} {'b' * 40} refs/heads/x\n".encode())
    reader = RefCommandReader(max_bytes=10 * len(line))

    reader.feed(line * 100)

    assert not reader.complete
    assert len(reader.updates) == 10


# --- fetch and push with stock git ----------------------------------------------------------


def test_clone_and_fetch_use_protocol_v2(served: Served, tmp_path: Path) -> None:
    target = tmp_path / "clone"
    result = served.git("operator", "clone", served.url, str(target), GIT_TRACE_PACKET="1")

    assert result.returncode == 0, result.stderr
    # upload-pack sends "version 2" only when GIT_PROTOCOL reached it.
    assert "clone< version 2" in result.stderr
    assert (target / "README.md").read_text() == "infrastructure\n"

    tree = served.repo.write_tree({"README.md": b"changed\n"})
    second = served.repo.commit_tree(tree, [served.main], "Change\n", AGENT)
    served.repo.update_ref("refs/heads/main", second, served.main)
    result = served.git("operator", "fetch", "origin", cwd=target, GIT_TRACE_PACKET="1")

    assert result.returncode == 0, result.stderr
    assert "fetch< version 2" in result.stderr
    fetched = subprocess.run(
        ["git", "rev-parse", "origin/main"], cwd=target, capture_output=True, text=True
    )
    assert fetched.stdout.strip() == second


def test_operator_push_to_main_reaches_on_push(served: Served, tmp_path: Path) -> None:
    target = tmp_path / "clone"
    clone(served, "operator", target)
    (target / "hardware.yaml").write_text("id: node-1\n")
    subprocess.run(["git", "add", "hardware.yaml"], cwd=target, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "Add node-1"], cwd=target, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=target, capture_output=True, text=True, check=True
    ).stdout.strip()

    result = served.git("operator", "push", "origin", "main", cwd=target)

    assert result.returncode == 0, result.stderr
    assert served.repo.rev_parse("refs/heads/main") == head
    assert [principal.name for principal in served.pushes] == ["alice"]
    assert served.pushes[0].role is Role.OPERATOR
    assert served.pushes[0].fingerprint == key_fingerprint(
        paramiko.Ed25519Key.from_private_key_file(str(served.keys.path("operator")))
    )


def rewrite_main(served: Served, target: Path) -> str:
    """Clone as the operator and commit a history that does not contain main."""
    clone(served, "operator", target)
    subprocess.run(["git", "checkout", "-q", "--orphan", "new"], cwd=target, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "Rewrite"], cwd=target, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=target, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_operator_force_push_main_rejected(served: Served, tmp_path: Path) -> None:
    rewritten = rewrite_main(served, tmp_path / "clone")

    result = served.git(
        "operator", "push", "--force", "origin", "HEAD:main", cwd=tmp_path / "clone"
    )

    assert result.returncode != 0
    assert "moves only by fast-forward" in result.stderr
    assert served.repo.rev_parse("refs/heads/main") == served.main != rewritten


@pytest.mark.parametrize(
    "served", [{"hook_settings": HookSettings(allow_force_push_main=True)}], indirect=True
)
def test_operator_force_push_main_configured(served: Served, tmp_path: Path) -> None:
    rewritten = rewrite_main(served, tmp_path / "clone")

    forced = served.git(
        "operator", "push", "--force", "origin", "HEAD:main", cwd=tmp_path / "clone"
    )
    deleted = served.git("operator", "push", "origin", ":main", cwd=tmp_path / "clone")

    assert forced.returncode == 0, forced.stderr
    assert served.repo.rev_parse("refs/heads/main") == rewritten
    assert deleted.returncode != 0
    assert served.repo.rev_parse("refs/heads/main") == rewritten


def test_hooks_path_in_repository_config_ignored(
    served: Served, agent_repo: GitRepo, tmp_path: Path
) -> None:
    # A hooks folder elsewhere, without the policy hook, named in the served repository's own
    # configuration: receive-pack still runs the policy.
    empty = tmp_path / "no-hooks"
    empty.mkdir()
    served.repo.run("config", "core.hooksPath", str(empty))
    commit = worker_event(served, agent_repo, "wf-a", WORKER_A, 0)

    result = served.git(
        "worker-a",
        "-C",
        str(agent_repo.path),
        "push",
        "--force",
        served.url,
        f"{commit}:refs/heads/main",
    )

    assert result.returncode != 0
    assert "tinkops: rejected refs/heads/main" in result.stderr
    assert served.repo.rev_parse("refs/heads/main") == served.main


def test_operator_cannot_push_workflow_ref(served: Served, tmp_path: Path) -> None:
    target = tmp_path / "clone"
    clone(served, "operator", target)
    ref = workflow_ref("wf-a")
    before = served.repo.rev_parse(ref)

    result = served.git("operator", "push", "--force", "origin", f"HEAD:{ref}", cwd=target)

    assert result.returncode != 0
    assert f"tinkops: rejected {ref}" in result.stderr
    assert served.repo.rev_parse(ref) == before


# --- authentication -------------------------------------------------------------------------


def test_unknown_key_rejected(served: Served, tmp_path: Path) -> None:
    result = served.git("stranger", "clone", served.url, str(tmp_path / "stolen"))

    assert result.returncode != 0
    assert "Permission denied (publickey)" in result.stderr
    assert not (tmp_path / "stolen").exists()
    clone(served, "operator", tmp_path / "after")


def test_password_none_and_interactive_auth_rejected(served: Served) -> None:
    transport = served.paramiko_client(key=None)
    try:
        with pytest.raises(paramiko.BadAuthenticationType) as password:
            transport.auth_password("git", "secret")
        assert password.value.allowed_types == ["publickey"]
        with pytest.raises(paramiko.BadAuthenticationType):
            transport.auth_none("git")
        with pytest.raises(paramiko.BadAuthenticationType):
            transport.auth_interactive("git", lambda title, instructions, prompts: [])
        stranger = paramiko.Ed25519Key.from_private_key_file(str(served.keys.path("stranger")))
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_publickey("git", stranger)
        assert not transport.is_authenticated()
    finally:
        transport.close()


@pytest.mark.parametrize("served", [{"limits": ServerLimits(max_auth_attempts=2)}], indirect=True)
def test_auth_attempts_limited(served: Served) -> None:
    transport = served.paramiko_client(key=None)
    try:
        stranger = paramiko.Ed25519Key.from_private_key_file(str(served.keys.path("stranger")))
        operator = paramiko.Ed25519Key.from_private_key_file(str(served.keys.path("operator")))
        for _ in range(2):
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_publickey("git", stranger)
        # Even the right key fails once the attempts are used up.
        with pytest.raises(paramiko.SSHException):
            transport.auth_publickey("git", operator)
        assert not transport.is_authenticated()
    finally:
        transport.close()


@pytest.mark.parametrize("served", [{"limits": ServerLimits(login_timeout=0.5)}], indirect=True)
def test_silent_client_disconnected(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.server.port), timeout=10) as sock:
        sock.recv(256)  # the server's version banner
        started = time.monotonic()
        while sock.recv(4096):
            pass
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("served", [{"limits": ServerLimits(idle_timeout=0.5)}], indirect=True)
def test_idle_connection_closed(served: Served) -> None:
    transport = served.paramiko_client()
    try:
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
    finally:
        transport.close()


@pytest.mark.parametrize(
    "served",
    [{"limits": ServerLimits(max_connection_time=1.0, idle_timeout=60.0)}],
    indirect=True,
)
def test_connection_time_limited(served: Served) -> None:
    transport = served.paramiko_client()
    try:
        channel = transport.open_session(timeout=10)
        channel.exec_command("git-upload-pack 'tinkops.git'")
        # upload-pack advertises its refs and waits: the command is busy, not idle.
        assert channel.recv(4)
        started = time.monotonic()
        channel.settimeout(10)
        while channel.recv(4096):
            pass
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)

        assert not transport.is_active()
        assert time.monotonic() - started < 5
    finally:
        transport.close()


# --- everything but git is rejected ---------------------------------------------------------


def exec_command(transport: paramiko.Transport, command: bytes) -> tuple[int, bytes]:
    channel = transport.open_session(timeout=10)
    try:
        channel.exec_command(command)
        stderr = channel.makefile_stderr("rb").read()
        return channel.recv_exit_status(), stderr
    finally:
        channel.close()


@pytest.mark.parametrize(
    "command",
    [
        b"ls",
        b"id; git-upload-pack 'tinkops.git'",
        b"git-upload-pack '../tinkops.git'",
        b"git-upload-pack '/etc/passwd'",
        b"git-receive-pack 'tinkops.git' extra",
        b"git-upload-pack '$(touch pwned)'",
        b"git-upload-pack 'tinkops.git'\nid",
        b"git-upload-pack 'tinkops.git'\0",
        b"git-upload-archive 'tinkops.git'",
    ],
)
def test_other_commands_rejected(served: Served, command: bytes, tmp_path: Path) -> None:
    transport = served.paramiko_client()
    try:
        status, stderr = exec_command(transport, command)
    finally:
        transport.close()

    assert status == 1
    assert stderr.startswith(b"tinkops: ")
    assert b"serves only git fetch and push" in stderr
    assert not (served.repo.path / "pwned").exists()
    clone(served, "operator", tmp_path / "after")


def test_openssh_command_rejected_with_message(served: Served, tmp_path: Path) -> None:
    env = served.git_env("operator")
    command = shlex.split(env["GIT_SSH_COMMAND"])
    result = subprocess.run(
        [*command, "-p", str(served.server.port), "git@127.0.0.1", "cat /etc/passwd"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )

    assert result.returncode == 1
    assert "tinkops: " in result.stderr
    assert "root:" not in result.stdout


def test_shell_pty_and_subsystem_rejected(served: Served, tmp_path: Path) -> None:
    transport = served.paramiko_client()
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

        channel = transport.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):
            channel.request_x11()
        channel.close()
    finally:
        transport.close()
    clone(served, "operator", tmp_path / "after")


def test_forwarding_rejected(
    served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    transport = served.paramiko_client()
    try:
        with pytest.raises(paramiko.SSHException):
            transport.request_port_forward("127.0.0.1", 0)
        with pytest.raises(paramiko.ChannelException):
            transport.open_channel(
                "direct-tcpip", ("127.0.0.1", served.server.port), ("127.0.0.1", 40000)
            )
        channel = transport.open_session(timeout=10)
        channel.request_forward_agent(lambda agent_channel: None)
        # The agent request has no reply; a request with one shows it was handled.
        with pytest.raises(paramiko.SSHException):
            channel.get_pty()
        channel.close()
    finally:
        transport.close()

    messages = [record.getMessage() for record in caplog.records]
    assert any("remote port forwarding" in message for message in messages)
    assert any("port forwarding (to 127.0.0.1" in message for message in messages)
    assert any("agent forwarding" in message for message in messages)
    clone(served, "operator", tmp_path / "after")


def first_packet(transport: paramiko.Transport, environment: dict[str, str]) -> bytes:
    """Run upload-pack with ``environment`` sent first; return its first pkt-line."""
    channel = transport.open_session(timeout=10)
    try:
        for name, value in environment.items():
            # paramiko sends env requests without asking for a reply.
            channel.set_environment_variable(name, value)
        channel.exec_command("git-upload-pack 'tinkops.git'")
        length = int(channel.recv(4), 16)
        data = b""
        while len(data) < length - 4:
            data += channel.recv(length - 4 - len(data))
        return data
    finally:
        channel.close()


def test_only_git_protocol_variable_accepted(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    transport = served.paramiko_client()
    try:
        accepted = first_packet(
            transport,
            {"LD_PRELOAD": "/nonexistent/evil.so", "GIT_DIR": "/etc", "GIT_PROTOCOL": "version=2"},
        )
        malformed = first_packet(transport, {"GIT_PROTOCOL": "version=2 && id"})
    finally:
        transport.close()

    assert accepted == b"version 2\n"
    # Without a valid GIT_PROTOCOL, upload-pack falls back to protocol v0: refs first.
    assert malformed.split(b" ")[0] == served.main.encode()
    messages = [record.getMessage() for record in caplog.records]
    for name in ("LD_PRELOAD", "GIT_DIR", "GIT_PROTOCOL"):
        assert any(f"environment variable '{name}'" in message for message in messages)


@pytest.mark.parametrize(
    "served", [{"limits": ServerLimits(max_sessions_per_key=1)}], indirect=True
)
def test_sessions_per_key_limited(served: Served) -> None:
    transport = served.paramiko_client()
    try:
        first = transport.open_session(timeout=10)
        first.exec_command("git-upload-pack 'tinkops.git'")
        # Protocol v0 upload-pack advertises its refs, then waits for the client.
        assert first.recv(4)

        status, stderr = exec_command(transport, b"git-upload-pack 'tinkops.git'")
        assert status == 1
        assert b"too many concurrent sessions" in stderr

        # A flush packet ends the request without wanting any object.
        first.sendall(b"0000")
        first.shutdown_write()
        assert first.recv_exit_status() == 0
        first.close()
    finally:
        transport.close()


def test_stop_ends_running_session(served: Served) -> None:
    transport = served.paramiko_client()
    try:
        channel = transport.open_session(timeout=10)
        channel.exec_command("git-upload-pack 'tinkops.git'")
        assert channel.recv(4)
        started = time.monotonic()
        served.server.stop()
        assert time.monotonic() - started < 10
        channel.settimeout(10)
        while channel.recv(4096):
            pass
        assert channel.closed or channel.eof_received
    finally:
        transport.close()


# --- worker pushes through the policy hook --------------------------------------------------


def test_worker_push_own_workflow_accepted(served: Served, agent_repo: GitRepo) -> None:
    commit = worker_event(served, agent_repo, "wf-a", WORKER_A, 0)

    result = served.git(
        "worker-a",
        "-C",
        str(agent_repo.path),
        "push",
        served.url,
        f"{commit}:{workflow_ref('wf-a')}",
    )

    assert result.returncode == 0, result.stderr
    assert served.repo.rev_parse(workflow_ref("wf-a")) == commit
    assert [principal.name for principal in served.pushes] == ["node-a"]
    assert served.pushes[0].worker_ids == (WORKER_A,)


def test_worker_push_other_workflow_rejected(served: Served, agent_repo: GitRepo) -> None:
    # Worker B's event, pushed with worker A's key.
    commit = worker_event(served, agent_repo, "wf-b", WORKER_B, 0)
    before = served.repo.rev_parse(workflow_ref("wf-b"))

    result = served.git(
        "worker-a",
        "-C",
        str(agent_repo.path),
        "push",
        served.url,
        f"{commit}:{workflow_ref('wf-b')}",
    )

    assert result.returncode != 0
    assert "tinkops: rejected refs/tinkops/workflows/wf-b" in result.stderr
    assert "has no task for 08:00:27:00:00:01" in result.stderr
    assert served.repo.rev_parse(workflow_ref("wf-b")) == before


def test_worker_push_to_main_rejected(served: Served, agent_repo: GitRepo) -> None:
    commit = worker_event(served, agent_repo, "wf-a", WORKER_A, 0)

    result = served.git(
        "worker-a",
        "-C",
        str(agent_repo.path),
        "push",
        "--force",
        served.url,
        f"{commit}:refs/heads/main",
    )

    assert result.returncode != 0
    assert "tinkops: rejected refs/heads/main" in result.stderr
    assert served.repo.rev_parse("refs/heads/main") == served.main


def test_worker_non_fast_forward_rejected(served: Served, agent_repo: GitRepo) -> None:
    ref = workflow_ref("wf-a")
    accepted = worker_event(served, agent_repo, "wf-a", WORKER_A, 0)
    result = served.git(
        "worker-a", "-C", str(agent_repo.path), "push", served.url, f"{accepted}:{ref}"
    )
    assert result.returncode == 0, result.stderr
    # A second event written on the old tip, as if the first had never been pushed.
    first = agent_repo.text("rev-list", "--max-parents=0", accepted).strip()
    agent_repo.update_ref(ref, first, accepted)
    rewritten = worker_event_on(agent_repo, first, "wf-a", WORKER_A, 1)

    result = served.git(
        "worker-a", "-C", str(agent_repo.path), "push", "--force", served.url, f"{rewritten}:{ref}"
    )

    assert result.returncode != 0
    assert "non-fast-forward" in result.stderr
    assert served.repo.rev_parse(ref) == accepted


def test_worker_workflow_change_rejected(served: Served, agent_repo: GitRepo) -> None:
    ref = workflow_ref("wf-a")
    event = worker_event(served, agent_repo, "wf-a", WORKER_A, 0)
    parent = agent_repo.rev_parse(ref)
    assert parent is not None
    tampered_blob = agent_repo.write_blob(b"id: wf-a\ntasks: []\n")
    root = agent_repo.write_root(event, {WORKFLOW_FILE: TreeEntry("100644", "blob", tampered_blob)})
    message = agent_repo.text("log", "-1", "--format=%B", event)
    tampered = agent_repo.commit_tree(root, [parent], message, AGENT)

    result = served.git(
        "worker-a", "-C", str(agent_repo.path), "push", served.url, f"{tampered}:{ref}"
    )

    assert result.returncode != 0
    assert "changes workflow.yaml" in result.stderr
    assert served.repo.rev_parse(ref) == parent


def test_worker_forged_trailer_rejected(served: Served, agent_repo: GitRepo) -> None:
    ref = workflow_ref("wf-a")
    # Worker A's key pushes an event that claims worker B ran action 2 (task-1/wipe).
    forged = worker_event(served, agent_repo, "wf-a", WORKER_B, 2)

    result = served.git(
        "worker-a", "-C", str(agent_repo.path), "push", served.url, f"{forged}:{ref}"
    )

    assert result.returncode != 0
    assert "Worker: '08:00:27:00:00:02'" in result.stderr
    assert served.repo.rev_parse(ref) != forged


def test_rejected_push_moves_no_ref(served: Served, agent_repo: GitRepo) -> None:
    good = worker_event(served, agent_repo, "wf-a", WORKER_A, 0)
    bad = worker_event(served, agent_repo, "wf-b", WORKER_B, 0)
    before = served.repo.refs("refs/")

    result = served.git(
        "worker-a",
        "-C",
        str(agent_repo.path),
        "push",
        "--atomic",
        served.url,
        f"{good}:{workflow_ref('wf-a')}",
        f"{bad}:{workflow_ref('wf-b')}",
    )

    assert result.returncode != 0
    assert served.repo.refs("refs/") == before
    # The pushed objects stayed in quarantine and were dropped with it.
    for commit in (good, bad):
        assert served.repo.execute("cat-file", "-e", commit).returncode != 0


def worker_event_on(local: GitRepo, parent: str, workflow_id: str, worker: str, index: int) -> str:
    definition = workflow(workflow_id, WORKER_A, WORKER_B)
    status = WorkflowStatus.from_json(local.read_file(parent, "state.json") or b"")
    status = apply_action_event(status, index, State.RUNNING, at=AT)
    task, action = definition.flat_actions()[index]
    event = Event(
        kind=EventKind.ACTION,
        workflow=workflow_id,
        workflow_state=status.state,
        worker=worker,
        message="started",
        event_id=f"rewrite-{index}",
        created_at=AT,
        task=task.name,
        action=action.name,
        action_index=index,
        action_state=State.RUNNING,
    )
    return append_event(local, parent, status, event, AGENT)


# --- keys -----------------------------------------------------------------------------------


def test_generated_key_matches_ssh_keygen(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        need("ssh-keygen (OpenSSH) is not installed")
    path = tmp_path / "id"
    public = generate_ed25519_key(path, "node@test")

    assert path.stat().st_mode & 0o777 == 0o600
    assert public.startswith("ssh-ed25519 ")
    assert public.endswith(" node@test")
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True
    )
    assert derived.stdout.split()[:2] == public.split()[:2]
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    private = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert listed.stdout.split()[1] == key_fingerprint(private)
    with pytest.raises(FileExistsError):
        generate_ed25519_key(path)


def test_static_directory_rejects_mismatched_fingerprint(keys: Keys) -> None:
    principal = Principal(Role.OPERATOR, "alice", "SHA256:not-this-key")
    with pytest.raises(ValueError, match="fingerprint"):
        StaticKeyDirectory([(principal, keys.public["operator"])])
