"""A fleet's load in CI: 50 agent processes against one ``tinkops serve``, which is killed
and restarted in the middle of the run. bench/load.py runs the same with 200 agents."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bench.load import LoadConfig, run_load

AGENTS = 50
ACTIONS = 2
# An agent retries a failed push 0.2 s later and doubles the wait up to 5 s. The provisioner
# is down for a few seconds, so an event needs a handful of attempts, not dozens.
MAX_ATTEMPTS = 20


def test_fifty_agents_survive_restart(tmp_path: Path, openssh_client: str) -> None:
    config = LoadConfig(
        agents=AGENTS, actions=ACTIONS, scratch=tmp_path, restart=True, timeout=150.0
    )

    result = run_load(config)

    summary = json.dumps(asdict(result), indent=2)
    assert result.problems == [], summary
    assert result.workflows_succeeded == AGENTS
    assert result.events_found == AGENTS * ACTIONS * 2
    assert result.lost_events == 0
    assert result.duplicate_events == 0
    assert result.max_attempts_per_event <= MAX_ATTEMPTS, summary
    assert result.unreachable_attempts > 0, "the restart should have made some pushes fail"
