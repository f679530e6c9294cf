"""A real OpenSSH server on loopback that serves git repositories through git-shell.

Each test gets its own sshd: a host key, an authorized_keys file whose entries force
``git-shell`` (fetch and push only, as on a plain git server) and a config that listens on
127.0.0.1 alone. The server runs as the current user and is stopped by the test.
"""

from __future__ import annotations

import base64
import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import need
from tinkops.identities import fingerprint_of_blob

SSHD = "/usr/sbin/sshd"
# sshd refuses to start without its privilege separation folder, which Debian's service
# creates at boot.
PRIVILEGE_SEPARATION_DIR = Path("/run/sshd")

CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {root}/host_ed25519_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AllowUsers {user}
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
AcceptEnv GIT_PROTOCOL
LogLevel VERBOSE
"""


@dataclass
class GitServer:
    """One running sshd; ``url`` names a repository on it."""

    root: Path
    port: int
    user: str
    host_key: str
    fingerprint: str
    process: subprocess.Popen[bytes]
    log: Path
    git_shell: str
    keys: list[str] = field(default_factory=list)

    def url(self, repository: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{repository}"

    def authorize(self, public_key: str) -> None:
        """Let ``public_key`` fetch and push, and nothing else (git-shell, no forwarding)."""
        key = " ".join(public_key.split()[:2])
        self.keys.append(key)
        forced = f'command="{self.git_shell} -c \\"$SSH_ORIGINAL_COMMAND\\"",restrict'
        lines = "".join(f"{forced} {item}\n" for item in self.keys)
        (self.root / "authorized_keys").write_text(lines)

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key}\n"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_git_server(root: Path) -> GitServer:
    """Start sshd on a free loopback port with its files in ``root``."""
    git_shell = shutil.which("git-shell")
    if not Path(SSHD).is_file() or git_shell is None or shutil.which("ssh-keygen") is None:
        need("OpenSSH's server (Debian's openssh-server) and git-shell are not installed")
        raise AssertionError("unreachable")
    if not PRIVILEGE_SEPARATION_DIR.is_dir():
        if os.geteuid() != 0:
            need(f"sshd needs {PRIVILEGE_SEPARATION_DIR}, which only root can create")
        PRIVILEGE_SEPARATION_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)

    root.mkdir(parents=True, exist_ok=True)
    host_key = root / "host_ed25519_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test-git-server", "-f", host_key],
        check=True,
    )
    public = (root / "host_ed25519_key.pub").read_text().split()
    (root / "authorized_keys").write_text("")
    user = getpass.getuser()
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(CONFIG.format(port=port, root=root, user=user))
    log = root / "sshd.log"
    process = subprocess.Popen(
        [SSHD, "-D", "-f", str(config), "-E", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    server = GitServer(
        root=root,
        port=port,
        user=user,
        host_key=f"{public[0]} {public[1]}",
        fingerprint=fingerprint_of_blob(base64.b64decode(public[1])),
        process=process,
        log=log,
        git_shell=git_shell,
    )
    _wait_until_listening(server)
    return server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_listening(server: GitServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    server.stop()
    text = server.log.read_text() if server.log.exists() else ""
    raise AssertionError(f"sshd did not start on 127.0.0.1:{server.port}:\n{text}")
