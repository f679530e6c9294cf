"""Fixtures shared by the whole suite: a clean environment, and the real components.

Tests that need Docker or the OpenSSH client skip when it is missing on a developer's
machine, but under CI=true a missing component fails the test instead, so CI never
passes by skipping.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BUSYBOX_IMAGE = "tinkops-test/busybox:1"
BUSYBOX_APPLETS = (
    "sh",
    "echo",
    "cat",
    "ls",
    "sleep",
    "true",
    "false",
    "mkdir",
    "env",
    "dd",
    "head",
    "printf",
    "test",
    "wc",
    "rm",
    "id",
    "hostname",
    "sha256sum",
    "seq",
)


def need(reason: str) -> None:
    """Skip the current test for ``reason``, or fail it when running in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def clean_environment(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep a developer's own git, ssh and docker settings out of every test."""
    home = tmp_path_factory.mktemp("home")
    for name in list(os.environ):
        if name.startswith(("GIT_", "SSH_", "TINKOPS_")) or name == "DOCKER_CONFIG":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test Operator")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "operator@example.test")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test Operator")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "operator@example.test")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    """A client for the local Docker engine; the engine must answer."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except DockerException as error:
        need(f"no Docker engine answers: {error}")
    yield client
    client.close()


def busybox_binary() -> Path | None:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("busybox")
    return Path(found) if found else None


def busybox_rootfs_tar() -> bytes:
    """Return a tar of a minimal root filesystem: a static busybox and its applet links."""
    binary = busybox_binary()
    if binary is None:
        need("busybox (Debian's busybox-static) is not installed")
        raise AssertionError("unreachable")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for folder in ("bin", "tmp", "workflow"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if folder == "tmp" else 0o755
            archive.addfile(info)
        data = binary.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        archive.addfile(info, io.BytesIO(data))
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            archive.addfile(link)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def busybox_image(docker_client: object) -> str:
    """The name of a tiny local image built with ``docker import``; nothing is pulled."""
    from docker.errors import ImageNotFound

    try:
        docker_client.images.get(BUSYBOX_IMAGE)  # type: ignore[attr-defined]
    except ImageNotFound:
        repository, tag = BUSYBOX_IMAGE.split(":")
        docker_client.images.client.api.import_image_from_data(  # type: ignore[attr-defined]
            busybox_rootfs_tar(),
            repository=repository,
            tag=tag,
            changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]'],
        )
    return BUSYBOX_IMAGE


@pytest.fixture(scope="session")
def openssh_client() -> str:
    found = shutil.which("ssh")
    if not found:
        need("the OpenSSH client (ssh) is not installed")
    return str(found)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: every test must run against the real components."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") == "true" and skipped and exitstatus == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line(f"{skipped} test(s) skipped; in CI every test must run")
