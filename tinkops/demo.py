"""``tinkops demo``: one real workflow, end to end, on this machine.

It creates a provisioner from the example layout, serves it on 127.0.0.1, starts an agent
process with its own key, pushes the example request with stock git over SSH, and shows the
workflow run. It uses Docker when an engine answers, and says plainly when it falls back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tinkops.errors import TinkopsError
from tinkops.home import LAYOUT_DIR, ProvisionerConfig, init_home
from tinkops.provisioner import Provisioner
from tinkops.repository import HARDWARE_DIR, WORKFLOWS_DIR
from tinkops.views import events_rows, state_rows, table
from tinkops_agent.eventlog import read_ephemeral, read_events, read_head
from tinkops_agent.protocol import DATA_FILE, workflow_ref

DEMO_IMAGE = "busybox:latest"
DEMO_WORKFLOW = "hello-1"
DEMO_WORKER = "08:00:27:00:00:01"


def run_demo(console: Console, *, home: Path | None, runtime: str, timeout: float) -> str:
    """Run the demo and return the workflow's final state."""
    with contextlib.ExitStack() as stack:
        if home is None:
            scratch = Path(tempfile.mkdtemp(prefix="tinkops-demo-"))
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
            home = scratch / "provisioner"

        console.rule("1. Provisioner")
        init_home(home, include_requests=False, port=0)
        provisioner = Provisioner(ProvisionerConfig.load(home))
        provisioner.start()
        stack.callback(provisioner.stop)
        console.print(f"Repository {provisioner.config.repository}, started from repo-layout/")
        console.print(f"SSH endpoint {provisioner.url}")
        console.print(f"Host key {provisioner.host_key_fingerprint}")

        console.rule("2. Agent")
        kind, notes = choose_runtime(runtime)
        for note in notes:
            console.print(f"[yellow]{note}[/yellow]")
        agent = start_agent(home, provisioner, kind)
        stack.callback(stop_process, agent)
        console.print(
            f"Agent for {DEMO_WORKER} running ({kind} runtime), pid {agent.pid}, "
            f"log {home / 'agent.log'}"
        )

        console.rule("3. Workflow request, pushed with git over SSH")
        push_request(console, home, provisioner)

        console.rule("4. Running")
        state = follow(console, provisioner, timeout)
        if state in ("", "PENDING", "RUNNING"):
            console.print(f"[red]The workflow did not finish within {timeout:.0f} s.[/red]")
            _show_log_tail(console, home / "agent.log")

        console.rule("5. Result")
        show_result(console, provisioner)
        return state
    raise AssertionError("unreachable")


def choose_runtime(requested: str) -> tuple[str, list[str]]:
    """Pick the runtime for the demo's agent and explain any fallback."""
    if requested == "process":
        return "process", [
            "Process runtime requested: each action's command runs directly on "
            "this machine, not in a container."
        ]
    if requested not in ("auto", "docker"):
        raise TinkopsError(f"--runtime {requested!r} is not one of auto, docker, process")
    import docker
    from docker.errors import DockerException, ImageNotFound

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except DockerException as error:
        if requested == "docker":
            raise TinkopsError(
                f"no Docker engine responds ({error}); start one or use --runtime process"
            ) from error
        return "process", [
            "No Docker engine answers on this machine, so the demo falls back to the process "
            "runtime: each action's command runs directly on this machine, not in a container."
        ]
    with contextlib.closing(client):
        try:
            client.images.get(DEMO_IMAGE)
            return "docker", []
        except ImageNotFound:
            pass
        busybox = shutil.which("busybox")
        if busybox is None:
            if requested == "docker":
                raise TinkopsError(
                    f"image {DEMO_IMAGE} is not present and busybox is not "
                    "installed to build it; load the image first"
                )
            return "process", [
                f"Image {DEMO_IMAGE} is not present and this machine has no "
                "busybox to build it from, so the demo falls back to the "
                "process runtime."
            ]
        build_busybox_image(client, Path(busybox), DEMO_IMAGE)
        return "docker", [
            f"Image {DEMO_IMAGE} was not present; the demo never pulls, so it "
            f"built a stand-in from this machine's {busybox} with docker import."
        ]


def build_busybox_image(client: object, busybox: Path, name: str) -> None:
    """Import a root filesystem holding only a static busybox and its applet links."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for folder in ("bin", "tmp", "workflow", "etc"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        archive.addfile(info, io.BytesIO(data))
        for applet in ("sh", "echo", "cat", "hostname", "printf", "sleep", "ls", "env"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            archive.addfile(link)
    repository, _, tag = name.partition(":")
    client.api.import_image_from_data(  # type: ignore[attr-defined]
        buffer.getvalue(),
        repository=repository,
        tag=tag or "latest",
        changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]'],
    )


def start_agent(home: Path, provisioner: Provisioner, kind: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "tinkops_agent.cli",
        "--worker-id",
        DEMO_WORKER,
        "--provisioner",
        provisioner.url,
        "--key",
        str(home / "keys" / "agent-machine1"),
        "--host-key",
        provisioner.host_key_line,
        "--state-dir",
        str(home / "agent"),
        "--runtime",
        kind,
        "--pull",
        "never",
        "--network",
        "none",
        "--poll-interval",
        "0.5",
    ]
    log = (home / "agent.log").open("ab")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def operator_git_env(home: Path, provisioner: Provisioner) -> dict[str, str]:
    known_hosts = home / "operator_known_hosts"
    host = f"[{provisioner.config.listen}]:{provisioner.server.port}"
    known_hosts.write_text(f"{host} {provisioner.host_key_line}\n")
    ssh = (
        f"ssh -F /dev/null -i {home / 'keys' / 'operator'} -o IdentitiesOnly=yes "
        f"-o BatchMode=yes -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
    )
    env = dict(os.environ)
    env.update(
        {
            "GIT_SSH_COMMAND": ssh,
            "GIT_AUTHOR_NAME": "Demo Operator",
            "GIT_AUTHOR_EMAIL": "operator@demo.invalid",
            "GIT_COMMITTER_NAME": "Demo Operator",
            "GIT_COMMITTER_EMAIL": "operator@demo.invalid",
        }
    )
    return env


def push_request(console: Console, home: Path, provisioner: Provisioner) -> None:
    """Clone the repository as the operator, add the example request, push it to main."""
    env = operator_git_env(home, provisioner)
    clone = home / "operator-clone"
    request = f"{WORKFLOWS_DIR}/{DEMO_WORKFLOW}.yaml"

    def git(shown: str, *args: str) -> None:
        console.print(f"$ {shown}", markup=False)
        result = subprocess.run(
            ["git", *args], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise TinkopsError(f"{shown} failed: {result.stderr.strip()}")

    git(
        f"git clone {provisioner.url} operator-clone",
        "clone",
        "--quiet",
        provisioner.url,
        str(clone),
    )
    console.print(f"$ cp repo-layout/{request} {request}", markup=False)
    (clone / WORKFLOWS_DIR).mkdir(exist_ok=True)
    shutil.copy(LAYOUT_DIR / request, clone / request)
    git(f"git add {request}", "-C", str(clone), "add", request)
    git(
        f"git commit -m 'Request workflow {DEMO_WORKFLOW}'",
        "-C",
        str(clone),
        "commit",
        "--quiet",
        "-m",
        f"Request workflow {DEMO_WORKFLOW}",
    )
    git("git push origin HEAD:main", "-C", str(clone), "push", "--quiet", "origin", "HEAD:main")
    hardware = ", ".join(p.name for p in (clone / HARDWARE_DIR).glob("*.yaml"))
    console.print(f"Hardware on main: {hardware}")


def follow(console: Console, provisioner: Provisioner, timeout: float) -> str:
    """Print each event as it lands; return the final (or last seen) workflow state."""
    repo = provisioner.repo
    ref = workflow_ref(DEMO_WORKFLOW)
    deadline = time.monotonic() + timeout
    seen = 0
    rendered = False
    state = ""
    while time.monotonic() < deadline:
        tip = repo.rev_parse(ref)
        if tip is None:
            time.sleep(0.1)
            continue
        if not rendered:
            console.print(f"Rendered workflow {DEMO_WORKFLOW} on {ref}")
            rendered = True
        events = read_events(repo, ref)
        for _commit, event in events[seen:]:
            status = event.action_state.value if event.action_state else ""
            console.print(
                f"  {status:<8} {event.task}/{event.action}  {event.message}", markup=False
            )
        seen = len(events)
        state = read_head(repo, tip).status.state.value
        if state not in ("PENDING", "RUNNING"):
            return state
        time.sleep(0.2)
    return state


def show_result(console: Console, provisioner: Provisioner) -> None:
    repo = provisioner.repo
    ref = workflow_ref(DEMO_WORKFLOW)
    if repo.rev_parse(ref) is None:
        console.print("The workflow was never rendered.")
        return
    head = read_head(repo, repo.rev_parse(ref) or "")
    console.print(f"$ tinkops workflow state {DEMO_WORKFLOW}")
    console.print(table(state_rows(head)))
    console.print(f"$ tinkops workflow events {DEMO_WORKFLOW}")
    console.print(table(events_rows([event for _c, event in read_events(repo, ref)])))
    data = read_ephemeral(repo, head.commit).get(DATA_FILE)
    if data is not None:
        console.print(f"$ tinkops workflow data {DEMO_WORKFLOW}")
        console.print(data.decode(errors="replace").rstrip(), markup=False)
    console.print(f"$ git log --reverse --format='%h %an: %s' {ref}")
    console.print(repo.text("log", "--reverse", "--format=%h %an: %s", ref).rstrip(), markup=False)


def _show_log_tail(console: Console, path: Path, lines: int = 20) -> None:
    if path.exists():
        console.print(f"Last lines of {path}:")
        for line in path.read_text(errors="replace").splitlines()[-lines:]:
            console.print("  " + line, markup=False)
