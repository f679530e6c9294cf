"""The embedded server requiring signed events: agents sign, unsigned pushes are rejected."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import (
    busybox_template,
    push_files,
    request,
    serve,
    tinkops,
    wait_for,
    workflow_state,
)


def test_signed_events_required(tmp_path: Path, openssh_client: str, busybox_image: str) -> None:
    home = tmp_path / "provisioner"
    tinkops("init", str(home), "--port", "0", "--no-requests")
    config = home / "config.yaml"
    config.write_text(
        config.read_text().replace("require_signed_events: false", "require_signed_events: true")
    )
    served = serve(home, init_args=None)
    try:
        clone = served.clone(tmp_path / "operator")
        push_files(
            served,
            clone,
            {
                "templates/signed.yaml": busybox_template(
                    "signed", [("one", "echo one")], busybox_image
                ),
                "workflows/signed-1.yaml": request("signed"),
                "workflows/unsigned-1.yaml": request("signed"),
            },
            "Request two workflows",
        )
        wait_for(lambda: workflow_state(served, "unsigned-1"), 30, "rendering")

        unsigned = served.start_agent(tmp_path / "unsigned", extra=("--no-sign-events", "--once"))
        unsigned.wait(timeout=60)
        assert workflow_state(served, "unsigned-1")["Workflow State"] == "PENDING"
        audit = (home / "audit.log").read_text()
        assert "not signed" in audit or "signature" in audit

        served.start_agent(tmp_path / "signed")
        for workflow_id in ("signed-1", "unsigned-1"):
            wait_for(
                lambda w=workflow_id: workflow_state(served, w).get("Workflow State") == "SUCCESS",
                90,
                f"{workflow_id} to succeed",
            )
        events = json.loads(
            tinkops("workflow", "events", "signed-1", "-o", "json", "--repo", str(home)).stdout
        )
        assert [e["action_status"] for e in events] == ["STATE_RUNNING", "STATE_SUCCESS"]
    finally:
        served.stop()
