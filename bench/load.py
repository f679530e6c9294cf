"""A fleet's load on one provisioner: N agent processes, each with its own MAC and key.

``python -m bench.load --agents 200 --actions 10`` starts ``tinkops serve`` on 127.0.0.1,
adds N hardware records (one SSH key each), a template of quick actions (``true``, process
runtime) and one request per machine, then starts N agents (``bench.load_agent``: the real
Agent loop with each push timed). It waits for every workflow to end and checks, from the
provisioner's repository, that each one succeeded with exactly its events: every action once
RUNNING and once SUCCESS, in order, every event id unique, every accepted push present. With
``--restart`` the provisioner is killed (SIGKILL) when about 40% of the events have landed and
started again on the same port.

Event latency is the time from an event's first push attempt until a push of it was accepted,
retries and provisioner downtime included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import repos
from tinkops.home import init_home
from tinkops.identities import generate_ed25519_key
from tinkops_agent.eventlog import read_events, read_heads
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import WORKFLOW_REF_PREFIX, State

ROOT = Path(__file__).resolve().parent.parent
SERVE = (sys.executable, "-m", "tinkops.cli", "serve")
KILL_AT = 0.4
"""The share of the expected events after which ``--restart`` kills the provisioner."""


@dataclass(frozen=True)
class LoadConfig:
    agents: int
    actions: int
    scratch: Path
    restart: bool = False
    timeout: float = 1800.0
    """Seconds the whole run may take before it is stopped and reported as failed."""
    start_spread: float = 10.0
    """Agents start evenly over this many seconds, as machines that boot over a while do."""
    poll_interval: float = 10.0
    max_retry_delay: float = 5.0
    sign_events: bool = False


@dataclass
class LoadResult:
    agents: int
    actions: int
    restart: bool
    events_expected: int
    events_found: int = 0
    workflows_succeeded: int = 0
    lost_events: int = 0
    duplicate_events: int = 0
    push_attempts: int = 0
    max_attempts_per_event: int = 0
    unreachable_attempts: int = 0
    rejected_attempts: int = 0
    seconds: float = 0.0
    events_per_second: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_max_ms: float = 0.0
    provisioner_peak_rss_mb: float = 0.0
    provisioner_cpu_seconds: float = 0.0
    """CPU time of ``tinkops serve`` and the git processes and hooks it ran (last start only)."""
    agent_rss_mb: float = 0.0
    """Mean resident memory of one agent process, sampled once mid-run."""
    load_average: float = 0.0
    """The one-minute load average at the end of the run (2 cores: 2.0 is full)."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def template(actions: int) -> bytes:
    lines = ['version: "0.1"', "name: load", "global_timeout: 3600", "tasks:"]
    lines += ["  - name: run", '    worker: "{{ device_1 }}"', "    actions:"]
    for index in range(actions):
        lines += [
            f"      - name: a{index:02d}",
            "        image: none",
            "        timeout: 60",
            '        command: ["true"]',
        ]
    return ("\n".join(lines) + "\n").encode()


def prepare(config: LoadConfig) -> tuple[Path, dict[str, Path]]:
    """Create the provisioner home with N machines and N requests; return it and the keys."""
    home = config.scratch / "provisioner"
    init_home(home, include_requests=False, generate_agent_keys=False, port=0)
    keys_dir = config.scratch / "keys"
    keys_dir.mkdir()
    files: dict[str, bytes] = {"templates/load.yaml": template(config.actions)}
    keys: dict[str, Path] = {}
    for number in range(1, config.agents + 1):
        worker = repos.mac(number)
        keys[worker] = keys_dir / f"agent-{number:04d}"
        public = generate_ed25519_key(keys[worker], f"load-agent-{number}")
        record = repos.hardware_record(number) + f"agent:\n  keys:\n    - {public}\n".encode()
        files[f"hardware/node-{number:05d}.yaml"] = record
        files[f"workflows/load-{number:04d}.yaml"] = (
            f"template: load\nhardware_map:\n  device_1: {worker}\n".encode()
        )
    repo = GitRepo(home / "repository.git")
    repos.commit_files(repo, config.scratch, files, f"Add {config.agents} machines\n")
    return home, keys


@dataclass
class Provisioner:
    """``tinkops serve`` as a child process on a fixed loopback port."""

    home: Path
    port: int
    process: subprocess.Popen[str] | None = None
    host_key: str = ""

    def start(self) -> None:
        log = (self.home / "serve.log").open("a")
        self.process = subprocess.Popen(
            [*SERVE, "--home", str(self.home), "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        log.close()
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith("Host key: "):
                self.host_key = " ".join(line.split()[2:4])
                return
        raise RuntimeError(f"tinkops serve did not start; see {self.home / 'serve.log'}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self._close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def cpu_seconds(self) -> float:
        """Return the CPU time of the process and of its children that have exited."""
        if self.process is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # Fields 14 to 17 of /proc/PID/stat: utime, stime, cutime, cstime, in clock ticks.
        ticks = sum(int(value) for value in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        if self.process is None:
            return 0.0
        return _status_kib(self.process.pid, "VmHWM") / 1024

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


def run_load(config: LoadConfig) -> LoadResult:
    """Run one load scenario end to end and return what was measured and checked."""
    home, keys = prepare(config)
    provisioner = Provisioner(home, _free_port())
    provisioner.start()
    repo = GitRepo(home / "repository.git")
    result = LoadResult(
        config.agents, config.actions, config.restart, config.agents * config.actions * 2
    )
    agents: list[subprocess.Popen[bytes]] = []
    try:
        _wait(lambda: len(repo.refs(WORKFLOW_REF_PREFIX)) == config.agents, 120, "rendering")
        known_hosts = config.scratch / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{provisioner.port} {provisioner.host_key}\n")
        url = f"ssh://tinkops@127.0.0.1:{provisioner.port}/tinkops.git"
        started = time.time()
        agents = _start_agents(config, keys, url, known_hosts)
        result.agent_rss_mb = _watch(config, agents, provisioner, result)
        result.seconds = time.time() - started
        result.provisioner_peak_rss_mb = provisioner.peak_rss_mb()
        result.provisioner_cpu_seconds = provisioner.cpu_seconds()
        result.load_average = os.getloadavg()[0]
    finally:
        for process in agents:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in agents:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        provisioner.stop()
    _check(config, repo, result)
    return result


def _start_agents(
    config: LoadConfig, keys: dict[str, Path], url: str, known_hosts: Path
) -> list[subprocess.Popen[bytes]]:
    agents = []
    pause = config.start_spread / max(config.agents, 1)
    for number, (worker, key) in enumerate(sorted(keys.items()), start=1):
        state = config.scratch / "agents" / f"{number:04d}"
        state.mkdir(parents=True)
        argv = [sys.executable, "-m", "bench.load_agent", "--worker-id", worker, "--url", url]
        argv += ["--key", str(key), "--known-hosts", str(known_hosts)]
        argv += ["--state-dir", str(state), "--record", str(state / "pushes.jsonl")]
        argv += ["--poll-interval", str(config.poll_interval)]
        argv += ["--max-retry-delay", str(config.max_retry_delay)]
        argv.append("--sign-events" if config.sign_events else "--no-sign-events")
        with (state / "agent.log").open("ab") as log:
            agents.append(
                subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
                )
            )
        time.sleep(pause)
    return agents


def _watch(
    config: LoadConfig,
    agents: list[subprocess.Popen[bytes]],
    provisioner: Provisioner,
    result: LoadResult,
) -> float:
    """Wait for every agent to exit; kill and restart the provisioner once with --restart.

    Returns the mean resident memory of a running agent, at the moment most agents ran.
    """
    deadline = time.monotonic() + config.timeout
    restarted = not config.restart
    rss = 0.0
    max_running = 0
    while running := [process for process in agents if process.poll() is None]:
        if time.monotonic() > deadline:
            result.problems.append(f"the run did not finish within {config.timeout:.0f} s")
            return rss
        if len(running) > max_running:
            max_running = len(running)
            rss = statistics.mean(_status_kib(p.pid, "VmRSS") for p in running) / 1024
        if not restarted and _accepted(config) >= KILL_AT * result.events_expected:
            provisioner.kill()
            time.sleep(2)
            provisioner.start()
            restarted = True
        time.sleep(1)
    failed = [process.args for process in agents if process.returncode != 0]
    if failed:
        result.problems.append(f"{len(failed)} agent(s) exited with an error")
    return rss


def _accepted(config: LoadConfig) -> int:
    total = 0
    for record in (config.scratch / "agents").glob("*/pushes.jsonl"):
        total += record.read_text().count('"accepted"')
    return total


def _check(config: LoadConfig, repo: GitRepo, result: LoadResult) -> None:
    """Check every workflow and event against the agents' push records; fill ``result``."""
    attempts = _push_records(config)
    tips = repo.refs(WORKFLOW_REF_PREFIX)
    heads = read_heads(repo, list(tips.values()))
    expected = [
        (f"a{index:02d}", state)
        for index in range(config.actions)
        for state in (State.RUNNING, State.SUCCESS)
    ]
    event_ids: Counter[str] = Counter()
    landed: set[str] = set()
    for ref, tip in sorted(tips.items()):
        workflow_id = ref.removeprefix(WORKFLOW_REF_PREFIX)
        if heads[tip].status.state is State.SUCCESS:
            result.workflows_succeeded += 1
        else:
            result.problems.append(f"workflow {workflow_id} is {heads[tip].status.state.value}")
        events = read_events(repo, ref)
        landed.update(commit for commit, _event in events)
        seen = [(event.action, event.action_state) for _commit, event in events]
        event_ids.update(event.event_id for _commit, event in events)
        result.events_found += len(seen)
        if seen != expected:
            missing = sum((Counter(expected) - Counter(seen)).values())
            extra = sum((Counter(seen) - Counter(expected)).values())
            result.lost_events += missing
            result.duplicate_events += extra
            result.problems.append(f"workflow {workflow_id} has events {seen}")
    result.duplicate_events += sum(count - 1 for count in event_ids.values() if count > 1)

    accepted = {commit for commit, pushes in attempts.items() if pushes[-1][0] == "accepted"}
    lost = accepted - landed
    result.lost_events += len(lost)
    if lost:
        result.problems.append(f"{len(lost)} accepted push(es) are missing from the repository")
    _latencies(attempts, result)


def _push_records(config: LoadConfig) -> dict[str, list[tuple[str, float, float]]]:
    """Return every event commit's push attempts (outcome, start, end) in order."""
    attempts: dict[str, list[tuple[str, float, float]]] = {}
    for record in sorted((config.scratch / "agents").glob("*/pushes.jsonl")):
        for line in record.read_text().splitlines():
            item = json.loads(line)
            attempts.setdefault(item["commit"], []).append(
                (item["outcome"], item["started"], item["ended"])
            )
    return attempts


def _latencies(attempts: dict[str, list[tuple[str, float, float]]], result: LoadResult) -> None:
    latencies = []
    first = last = 0.0
    for pushes in attempts.values():
        outcomes = [outcome for outcome, _start, _end in pushes]
        result.push_attempts += len(pushes)
        result.max_attempts_per_event = max(result.max_attempts_per_event, len(pushes))
        result.unreachable_attempts += outcomes.count("unreachable")
        result.rejected_attempts += outcomes.count("rejected")
        if outcomes[-1] == "accepted":
            latencies.append(pushes[-1][2] - pushes[0][1])
            first = min(first or pushes[0][1], pushes[0][1])
            last = max(last, pushes[-1][2])
    if latencies:
        result.latency_p50_ms = statistics.median(latencies) * 1000
        result.latency_p95_ms = _percentile(latencies, 0.95) * 1000
        result.latency_max_ms = max(latencies) * 1000
        result.events_per_second = len(latencies) / max(last - first, 1e-6)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _status_kib(pid: int, field_name: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.load", description=__doc__)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--actions", type=int, default=10)
    parser.add_argument(
        "--restart", action="store_true", help="kill and restart the provisioner mid-run"
    )
    parser.add_argument("--sign-events", action="store_true", help="agents sign their events")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tinkops-load-") as folder:
        config = LoadConfig(
            agents=args.agents,
            actions=args.actions,
            scratch=Path(folder),
            restart=args.restart,
            timeout=args.timeout,
            sign_events=args.sign_events,
        )
        result = run_load(config)
    figures = asdict(result)
    print(json.dumps(figures, indent=2))
    if args.json:
        with args.json.open("a") as stream:
            stream.write(json.dumps(figures) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
