"""One agent of a load run: ``python -m bench.load_agent``.

It runs the real ``Agent`` loop with the process runtime. Only its ``Remote`` is wrapped: it
writes one JSON line per push attempt (commit, outcome, start and end time), and it stops the
agent once the push of its workflow's final event was accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from tinkops_agent.agent import Agent, AgentConfig
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.process_runtime import ProcessRuntime
from tinkops_agent.protocol import STATE_FILE, ProtocolError, WorkflowStatus
from tinkops_agent.remote import PushOutcome, PushResult, Remote, ssh_command


class TimedRemote(Remote):
    """A Remote that records every push attempt and ends the agent after its last event."""

    def __init__(
        self, local: GitRepo, url: str, ssh: str, record: TextIO, stop: threading.Event
    ) -> None:
        super().__init__(local, url, ssh)
        self.record = record
        self.stop = stop

    def push(self, commit: str, workflow_id: str) -> PushResult:
        started = time.time()
        result = super().push(commit, workflow_id)
        line = {
            "commit": commit,
            "workflow": workflow_id,
            "outcome": result.outcome.value,
            "started": started,
            "ended": time.time(),
        }
        self.record.write(json.dumps(line) + "\n")
        self.record.flush()
        if result.outcome is PushOutcome.ACCEPTED and self._ended(commit):
            self.stop.set()
        return result

    def _ended(self, commit: str) -> bool:
        raw = self.local.read_file(commit, STATE_FILE)
        try:
            return raw is not None and WorkflowStatus.from_json(raw).state.terminal
        except ProtocolError:
            return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.load_agent", description=__doc__)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--known-hosts", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True, help="JSON lines of push attempts")
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--max-retry-delay", type=float, default=5.0)
    parser.add_argument("--sign-events", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    local_path = args.state_dir / "repository.git"
    if not (local_path / "HEAD").exists():
        local_path.mkdir(parents=True, exist_ok=True)
        GitRepo(local_path).run("init", "--quiet", "--bare")
    local = GitRepo(local_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = AgentConfig(
        worker_id=args.worker_id,
        state_dir=args.state_dir.resolve(),
        poll_interval=args.poll_interval,
        poll_jitter=0.5,
        max_retry_delay=args.max_retry_delay,
        sign_events=args.sign_events,
        signing_key=args.key.resolve(),
    )
    with args.record.open("a") as record:
        ssh = ssh_command(args.key.resolve(), args.known_hosts.resolve())
        remote = TimedRemote(local, args.url, ssh, record, stop)
        Agent(config, local, remote, ProcessRuntime(), stop).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
