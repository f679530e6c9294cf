"""tinkops benchmarks: reconcile throughput and latency, event round trip, memory.

Run with ``./dev bench`` (or ``.venv/bin/python -m bench.run``); ``--quick`` uses smaller
repositories. Results go to docs/benchmarks.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench import repos
from tinkops.home import ProvisionerConfig
from tinkops.provisioner import Provisioner
from tinkops.reconciler import Reconciler
from tinkops_agent.eventlog import append_event, new_event_id, read_events, read_head, utc_now
from tinkops_agent.gitrepo import GitRepo, Identity
from tinkops_agent.protocol import Event, EventKind, State, apply_action_event, workflow_ref
from tinkops_agent.remote import ssh_command

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Results:
    sizes: dict[str, int] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def wait_until(condition: Callable[[], object], timeout: float = 60.0, step: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(step)


# --- (1) throughput -------------------------------------------------------------------------


def throughput(scratch: Path, requests: int, baseline_requests: int, results: Results) -> None:
    repo = repos.create(scratch / "throughput", hardware=100)
    repos.commit_files(
        repo,
        scratch,
        {f"workflows/t{n:06d}.yaml": repos.request_text(1 + n % 100) for n in range(requests)},
        "Merge many requests\n",
    )
    started = time.perf_counter()
    created = Reconciler(repo).reconcile().created
    seconds = time.perf_counter() - started
    assert len(created) == requests, f"rendered {len(created)} of {requests}"
    results.figures["throughput_per_s"] = requests / seconds
    results.figures["throughput_seconds"] = seconds

    # The obvious baseline: one git process per object and ref, as plumbing scripts do.
    base = repos.create(scratch / "baseline", hardware=100)
    repos.commit_files(
        base,
        scratch,
        {
            f"workflows/b{n:06d}.yaml": repos.request_text(1 + n % 100)
            for n in range(baseline_requests)
        },
        "Merge requests\n",
    )
    reconciler = Reconciler(base)
    reconciler.writer = None
    started = time.perf_counter()
    assert len(reconciler.reconcile().created) == baseline_requests
    results.figures["baseline_per_s"] = baseline_requests / (time.perf_counter() - started)


# --- (2) latency ----------------------------------------------------------------------------


def operator_env(home: Path, provisioner: Provisioner) -> dict[str, str]:
    known_hosts = home / "bench_known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{provisioner.server.port} {provisioner.host_key_line}\n")
    env = dict(os.environ)
    env["GIT_SSH_COMMAND"] = (
        f"ssh -F /dev/null -i {home / 'keys' / 'operator'} "
        f"-o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
    )
    env.update(
        {
            "GIT_AUTHOR_NAME": "bench",
            "GIT_AUTHOR_EMAIL": "b@bench.invalid",
            "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "b@bench.invalid",
        }
    )
    return env


def latency(home: Path, samples: int, label: str, results: Results) -> None:
    """Push one request at a time over SSH and time until its workflow ref exists."""
    config = ProvisionerConfig.load(home)
    config.port = 0
    provisioner = Provisioner(config)
    provisioner.start()
    try:
        wait_until(lambda: provisioner.reconciler.reconcile().commit, timeout=600)
        env = operator_env(home, provisioner)
        clone = home / "bench-clone"
        subprocess.run(
            [
                "git",
                "clone",
                "--quiet",
                "--no-checkout",
                "--depth",
                "1",
                provisioner.url,
                str(clone),
            ],
            env=env,
            check=True,
        )
        subprocess.run(
            ["git", "-C", str(clone), "config", "core.sparseCheckout", "false"], check=True
        )
        end_to_end: list[float] = []
        after_push: list[float] = []
        for number in range(samples):
            name = f"lat-{label}-{number}"
            commit = _request_commit(clone, name, env)
            started = time.perf_counter()
            subprocess.run(
                ["git", "-C", str(clone), "push", "--quiet", "origin", f"{commit}:refs/heads/main"],
                env=env,
                check=True,
            )
            pushed = time.perf_counter()
            wait_until(lambda n=name: provisioner.repo.rev_parse(workflow_ref(n)))
            done = time.perf_counter()
            end_to_end.append(done - started)
            after_push.append(done - pushed)
        results.figures[f"latency_{label}_p50_ms"] = statistics.median(end_to_end) * 1000
        results.figures[f"latency_{label}_p95_ms"] = percentile(end_to_end, 0.95) * 1000
        results.figures[f"render_{label}_p50_ms"] = statistics.median(after_push) * 1000
        results.figures[f"render_{label}_p95_ms"] = percentile(after_push, 0.95) * 1000
    finally:
        provisioner.stop()


def _request_commit(clone: Path, name: str, env: dict[str, str]) -> str:
    """Commit one request on top of the clone's main without a work tree."""
    git = ["git", "-C", str(clone)]
    blob = (
        subprocess.run(
            [*git, "hash-object", "-w", "--stdin"],
            input=repos.request_text(1),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    index = {"GIT_INDEX_FILE": str(clone / "bench-index"), **env}
    subprocess.run([*git, "read-tree", "HEAD"], env=index, check=True)
    subprocess.run(
        [*git, "update-index", "--add", "--cacheinfo", f"100644,{blob},workflows/{name}.yaml"],
        env=index,
        check=True,
    )
    tree = (
        subprocess.run([*git, "write-tree"], env=index, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )
    commit = (
        subprocess.run(
            [*git, "commit-tree", tree, "-p", "HEAD", "-m", f"Request {name}"],
            env=env,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    subprocess.run([*git, "update-ref", "HEAD", commit], check=True)
    return commit


# --- (3) event round trip -------------------------------------------------------------------


def event_round_trip(scratch: Path, samples: int, results: Results) -> None:
    """Push event commits as an agent does (stock git over SSH, the agent's key) and time
    until ``workflow events`` on the provisioner lists them."""
    home = scratch / "events"
    repos.create(home, hardware=0)
    config = ProvisionerConfig.load(home)
    config.port = 0
    provisioner = Provisioner(config)
    provisioner.start()
    try:
        results.figures.update(_round_trips(home, provisioner, samples))
    finally:
        provisioner.stop()


def _round_trips(home: Path, provisioner: Provisioner, samples: int) -> dict[str, float]:
    from tinkops.gitops import commit_file
    from tinkops.identities import generate_ed25519_key

    key = home / "keys" / "bench-agent"
    public = generate_ed25519_key(key, "bench-agent")
    record = repos.hardware_record(1).decode() + f"agent:\n  keys:\n    - {public}\n"
    commit_file(provisioner.repo, "hardware/node-00001.yaml", record.encode(), "Add node\n")
    commit_file(
        provisioner.repo, "workflows/events-1.yaml", repos.request_text(1), "Request events-1\n"
    )
    wait_until(
        lambda: (
            provisioner.reconciler.reconcile().commit
            and provisioner.repo.rev_parse(workflow_ref("events-1"))
        ),
        timeout=60,
    )

    agent_repo = GitRepo(home / "bench-agent.git")
    agent_repo.path.mkdir()
    agent_repo.run("init", "--quiet", "--bare")
    known_hosts = home / "bench_known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{provisioner.server.port} {provisioner.host_key_line}\n")
    # The agent's own SSH command, shared connection included.
    control = Path(tempfile.mkdtemp(prefix="tinkops-ssh-", dir="/tmp"))
    env = {"GIT_SSH_COMMAND": ssh_command(key, known_hosts, control_dir=control)}
    agent_repo.run(
        "fetch", "--quiet", provisioner.url, f"{workflow_ref('events-1')}:refs/w", env=env
    )
    head = read_head(agent_repo, agent_repo.rev_parse("refs/w") or "")
    worker = repos.mac(1)
    identity = Identity("bench agent", "agent@bench.invalid")
    trips: list[float] = []
    for number in range(samples):
        # Every sample reports the action RUNNING again: the smallest event an agent pushes.
        status = apply_action_event(head.status, 0, State.RUNNING, at=utc_now())
        event = Event(
            kind=EventKind.ACTION,
            workflow="events-1",
            workflow_state=status.state,
            worker=worker,
            message=f"bench event {number}",
            event_id=new_event_id(),
            created_at=utc_now(),
            task="hello-world",
            action="hello-world",
            action_index=0,
            action_state=State.RUNNING,
        )
        commit = append_event(agent_repo, head.commit, status, event, identity)
        started = time.perf_counter()
        agent_repo.run(
            "push", "--quiet", provisioner.url, f"{commit}:{workflow_ref('events-1')}", env=env
        )
        wait_until(lambda c=commit: provisioner.repo.rev_parse(workflow_ref("events-1")) == c)
        listed = read_events(provisioner.repo, workflow_ref("events-1"))
        assert listed[-1][0] == commit
        trips.append(time.perf_counter() - started)
        head = read_head(agent_repo, commit)
    return {
        "event_round_trip_p50_ms": statistics.median(trips) * 1000,
        "event_round_trip_p95_ms": percentile(trips, 0.95) * 1000,
    }


# --- (4) memory -----------------------------------------------------------------------------


def peak_memory(home: Path, results: Results) -> None:
    """Run a cold reconcile pass over the large repository in a child and read its peak RSS."""
    code = (
        "import resource, sys; from tinkops.reconciler import Reconciler; "
        "from tinkops_agent.gitrepo import GitRepo; "
        "Reconciler(GitRepo(sys.argv[1])).reconcile(); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, str(home / "repository.git")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    results.figures["cold_pass_seconds"] = time.perf_counter() - started
    results.figures["peak_memory_mb"] = int(out.split()[-1]) / 1024


# --- report ---------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{memory:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "git": git,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small repositories (a smoke run)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument(
        "--from-json", type=Path, help="only render the page from figures an earlier run wrote"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results = Results(sizes=saved["sizes"], figures=saved["figures"])
        args.output.write_text(render_report(saved["machine"], results))
        print(f"wrote {args.output}")
        return 0

    scale = (
        {"requests": 1000, "baseline": 100, "hardware": 1000, "workflows": 5000, "samples": 10}
        if args.quick
        else {
            "requests": 10_000,
            "baseline": 500,
            "hardware": 10_000,
            "workflows": 100_000,
            "samples": 40,
        }
    )
    results = Results(sizes=dict(scale))
    with tempfile.TemporaryDirectory(prefix="tinkops-bench-") as folder:
        scratch = Path(folder)
        print(f"throughput: {scale['requests']} requests in one commit", flush=True)
        throughput(scratch, scale["requests"], scale["baseline"], results)
        print("latency: empty repository", flush=True)
        empty = scratch / "empty"
        repos.create(empty, hardware=1)
        latency(empty, scale["samples"], "empty", results)
        print(f"latency: {scale['hardware']} machines, {scale['workflows']} workflows", flush=True)
        large = scratch / "large"
        started = time.perf_counter()
        repos.create(
            large,
            hardware=scale["hardware"],
            requests=scale["workflows"],
            rendered=scale["workflows"],
        )
        results.figures["generate_seconds"] = time.perf_counter() - started
        peak_memory(large, results)
        latency(large, scale["samples"], "large", results)
        print("event round trip", flush=True)
        event_round_trip(scratch, scale["samples"], results)

    info = machine()
    print(json.dumps(results.figures, indent=2))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "sizes": results.sizes, "figures": results.figures}, indent=2
            )
        )
    if not args.quick:
        args.output.write_text(render_report(info, results))
        print(f"wrote {args.output}")
    return 0


def render_report(info: dict[str, str], results: Results) -> str:
    f = results.figures
    s = results.sizes
    ratio_latency = f["latency_large_p50_ms"] / f["latency_empty_p50_ms"]
    ratio_render = f["render_large_p50_ms"] / max(f["render_empty_p50_ms"], 0.001)
    rows = [
        (
            f"Rendered per second, one merge of {s['requests']:,} requests",
            f"{f['throughput_per_s']:,.0f}/s",
            "≥ 1,000/s",
            f["throughput_per_s"] >= 1000,
        ),
        (
            f"Same, one git process per object (baseline, {s['baseline']} requests)",
            f"{f['baseline_per_s']:,.0f}/s",
            f"ratio {f['throughput_per_s'] / f['baseline_per_s']:.1f}×",
            None,
        ),
        (
            "Request pushed over SSH → workflow exists, empty repo, p50 / p95",
            f"{f['latency_empty_p50_ms']:.0f} / {f['latency_empty_p95_ms']:.0f} ms",
            "p50 ≤ 100 ms",
            f["latency_empty_p50_ms"] <= 100,
        ),
        (
            f"Same, {s['hardware']:,} machines and {s['workflows']:,} workflows, p50 / p95",
            f"{f['latency_large_p50_ms']:.0f} / {f['latency_large_p95_ms']:.0f} ms",
            f"≤ 2× empty (is {ratio_latency:.2f}×)",
            ratio_latency <= 2,
        ),
        (
            "Push landed → workflow exists (reconciler only), empty / large, p50",
            f"{f['render_empty_p50_ms']:.0f} / {f['render_large_p50_ms']:.0f} ms",
            f"ratio {ratio_render:.2f}×",
            None,
        ),
        (
            "Agent event push over SSH → listed by workflow events, p50 / p95",
            f"{f['event_round_trip_p50_ms']:.0f} / {f['event_round_trip_p95_ms']:.0f} ms",
            "p50 ≤ 100 ms",
            f["event_round_trip_p50_ms"] <= 100,
        ),
        (
            f"Reconciler peak memory, cold pass over {s['workflows']:,} workflows",
            f"{f['peak_memory_mb']:.0f} MB",
            "≤ 300 MB",
            f["peak_memory_mb"] <= 300,
        ),
    ]
    lines = [
        "# Benchmarks",
        "",
        "Measured by `./dev bench` (bench/run.py) on "
        f"{datetime.now(UTC).strftime('%Y-%m-%d')}. Every figure comes from real git "
        "repositories in a temporary folder, the embedded SSH server on 127.0.0.1 and stock "
        "git and OpenSSH clients; nothing is mocked.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        "",
        "## Results",
        "",
        "| measurement | result | target | met |",
        "|---|---|---|---|",
        *[
            f"| {name} | {value} | {target} | "
            f"{'' if met is None else ('yes' if met else '**no**')} |"
            for name, value, target, met in rows
        ],
        "",
        f"Generating the large repository took {f['generate_seconds']:.0f} s; a cold pass "
        f"over it (first start of the reconciler, reading every file) took "
        f"{f['cold_pass_seconds']:.1f} s.",
        "",
        "## How each figure is taken",
        "",
        "- Throughput: a repository with 100 machines gets one commit adding every request; "
        "the time is one reconcile pass, in process, until every workflow ref exists.",
        "- Latency: `tinkops serve` components run in process; each sample commits one "
        "request in a clone and pushes it with `git push` over SSH, then polls for the "
        "workflow ref every 2 ms. The large repository has its workflows finished and refs "
        "packed, as after long use.",
        "- Event round trip: an event commit made as the agent makes it is pushed with the "
        "agent's key, then read back with the same code as `tinkops workflow events`.",
        "- Memory: peak resident size of a separate process running one cold pass.",
        *[f"- Note: {note}" for note in results.notes],
        "",
        "## Where the targets are missed, and why",
        "",
        "- Pushes over SSH: rendering takes a few milliseconds once a push has landed (the "
        "reconciler-only row), but a push itself costs about 200 ms here. Most of that is the "
        "pre-receive hook, a Python process that imports the push policy and runs several "
        "git commands; the agent already reuses one SSH connection. Checking pushes inside "
        "the provisioner process, with a small hook that only forwards the request, is the "
        "next step.",
        "- The large repository: git's receive-pack checks every push's connectivity against "
        "all refs, and with 100,000 workflow refs that costs over a second per push, although "
        "the reconciler's own work stays in tens of milliseconds. Hiding refs from the push "
        "advertisement did not remove it. Archiving moves finished workflows out of the "
        "active namespace but they stay refs; folding archived workflows into one ref (a "
        "commit per archive batch whose parents are their tips) would.",
        "- Throughput: rendering, validation and object writes in Python cost about 1 ms per "
        "workflow; the pack and the single ref transaction keep git's share small.",
        "- Memory: the reconciler keeps every parsed record of main in memory (about 5 KB "
        "per file); records could be dropped once rendered.",
        "",
        "The load of many agents at once is measured by bench/load.py; see [load.md](load.md).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
