"""The agent trusts only the provisioner's pinned host key, through the real agent CLI.

Each test runs ``python -m tinkops_agent.cli --once`` against a real provisioner on 127.0.0.1.
Without requests, one run fetches the worker's (empty) queue and exits 0, so a successful run
shows that a fetch happened. The provisioner runs in this process, so its log shows whether any
git command ran.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from tinkops.home import ProvisionerConfig, init_home
from tinkops.identities import Principal, Role, StaticKeyDirectory, generate_ed25519_key
from tinkops.provisioner import Provisioner
from tinkops.sshserver import GitSSHServer

WORKER_1 = "08:00:27:00:00:01"
AGENT_TIMEOUT = 60


@dataclass
class Site:
    """A provisioner home, and the provisioner serving it while ``running``."""

    home: Path
    provisioner: Provisioner
    port: int
    running: bool = True

    @property
    def agent_key(self) -> Path:
        return self.home / "keys" / "agent-machine1"

    def stop(self) -> None:
        if self.running:
            self.provisioner.stop()
            self.running = False

    def restart(self) -> None:
        """Start the provisioner again from its home, on the same port."""
        self.stop()
        config = ProvisionerConfig.load(self.home)
        config.port = self.port
        self.provisioner = Provisioner(config)
        self.provisioner.start()
        self.running = True


@pytest.fixture
def site(tmp_path: Path, openssh_client: str) -> Iterator[Site]:
    home = tmp_path / "provisioner"
    init_home(home, include_requests=False, port=0)
    provisioner = Provisioner(ProvisionerConfig.load(home))
    provisioner.start()
    site = Site(home, provisioner, provisioner.server.port)
    try:
        yield site
    finally:
        site.stop()


def run_agent(
    url: str, key: Path, state_dir: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "tinkops_agent.cli",
        "--worker-id",
        WORKER_1,
        "--provisioner",
        url,
        "--key",
        str(key),
        "--state-dir",
        str(state_dir),
        "--runtime",
        "process",
        "--poll-interval",
        "0.2",
        "--once",
        *options,
    ]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=AGENT_TIMEOUT,
        check=False,
    )


def git_commands(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("tinkops.ssh") and " runs git " in record.getMessage()
    ]


def test_wrong_fingerprint_exits_before_fetch(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    state = tmp_path / "agent"
    wrong = "SHA256:" + "A" * 43

    result = run_agent(site.provisioner.url, site.agent_key, state, "--host-key-fingerprint", wrong)

    assert result.returncode == 2, result.stderr
    assert f"presented host key {site.provisioner.host_key_fingerprint}" in result.stderr
    assert f"expected {wrong}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (state / "known_hosts").exists()
    assert not (state / "repository.git").exists()
    assert git_commands(caplog) == []


def test_wrong_fingerprint_in_config_file(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    state = tmp_path / "agent"
    config = tmp_path / "agent.yaml"
    config.write_text(f"host_key_fingerprint: SHA256:{'B' * 43}\n")

    result = run_agent(site.provisioner.url, site.agent_key, state, "--config", str(config))

    assert result.returncode == 2, result.stderr
    assert "presented host key" in result.stderr
    assert not (state / "repository.git").exists()
    assert git_commands(caplog) == []


def test_right_fingerprint_fetches(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    state = tmp_path / "agent"
    fingerprint = site.provisioner.host_key_fingerprint

    result = run_agent(
        site.provisioner.url, site.agent_key, state, "--host-key-fingerprint", fingerprint
    )

    assert result.returncode == 0, result.stderr
    assert site.provisioner.host_key_line in (state / "known_hosts").read_text()
    assert any("(worker 'machine1') runs git upload-pack" in line for line in git_commands(caplog))


def test_no_pin_without_flag(site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    state = tmp_path / "agent"

    result = run_agent(site.provisioner.url, site.agent_key, state)

    assert result.returncode == 2, result.stderr
    assert "no provisioner host key given" in result.stderr
    assert "--trust-on-first-use" in result.stderr
    assert not (state / "known_hosts").exists()
    assert not (state / "repository.git").exists()
    assert git_commands(caplog) == []


def test_trust_on_first_use_pins_key(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    state = tmp_path / "agent"
    url = site.provisioner.url

    first = run_agent(url, site.agent_key, state, "--trust-on-first-use")

    assert first.returncode == 0, first.stderr
    assert "trusting the provisioner's host key on first use" in first.stderr
    pinned = (state / "known_hosts").read_text()
    assert site.provisioner.host_key_line in pinned
    assert len(git_commands(caplog)) == 1

    # The agent restarts, and so does the provisioner, which keeps its host key.
    site.restart()
    again = run_agent(url, site.agent_key, state, "--trust-on-first-use")

    assert again.returncode == 0, again.stderr
    assert "trusting the provisioner's host key on first use" not in again.stderr
    assert (state / "known_hosts").read_text() == pinned


def test_pinned_key_survives_restart(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tinkops")
    state = tmp_path / "agent"
    url = site.provisioner.url
    first = run_agent(url, site.agent_key, state, "--trust-on-first-use")
    assert first.returncode == 0, first.stderr
    pinned = (state / "known_hosts").read_text()

    # An impostor takes the provisioner's port with another host key. It accepts the agent's
    # key, so only the pinned host key stops the agent from talking to it.
    site.stop()
    impostor_key_path = tmp_path / "impostor_host_key"
    generate_ed25519_key(impostor_key_path)
    agent = paramiko.Ed25519Key.from_private_key_file(str(site.agent_key))
    agent_public = f"{agent.get_name()} {agent.get_base64()}"
    keys = StaticKeyDirectory([(Principal(Role.WORKER, "machine1", "", (WORKER_1,)), agent_public)])
    impostor = GitSSHServer(
        site.provisioner.config.repository,
        paramiko.Ed25519Key.from_private_key_file(str(impostor_key_path)),
        keys,
        port=site.port,
    )
    caplog.clear()
    with impostor:
        restarted = run_agent(url, site.agent_key, state, "--trust-on-first-use")

    assert restarted.returncode != 0
    # OpenSSH reports "Host key verification failed"; the agent may reword it.
    assert "host key" in restarted.stderr.lower()
    assert (state / "known_hosts").read_text() == pinned
    assert git_commands(caplog) == []
    # The real provisioner comes back with its own key, and the agent works again.
    site.restart()
    assert run_agent(url, site.agent_key, state, "--trust-on-first-use").returncode == 0
