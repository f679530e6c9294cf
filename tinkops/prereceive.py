"""The pre-receive hook that enforces the push policy: ``python -m tinkops.prereceive``.

git runs the hook once per push, inside the repository, with one ``<old> <new> <ref>`` line per
ref on stdin. The pushed objects wait in a quarantine directory that git names in the hook's
environment (GIT_OBJECT_DIRECTORY, GIT_QUARANTINE_PATH). So every ``git`` command run here reads
them, and a rejected push leaves nothing behind. The SSH server names the pusher in the
TINKOPS_* variables of ``tinkops.identities`` and passes the policy settings and the audit
log's path in the variables below. A push without a pusher (a local push on the provisioner)
is allowed and not audited.

For each push from the SSH server, the hook writes an audit record before any ref moves. When
that write fails, the push is rejected, so no push goes through unrecorded.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from tinkops.audit import AuditRecord, Decision, Stage, append_record, ref_changes
from tinkops.identities import (
    ENV_KEY_FINGERPRINT,
    ENV_PRINCIPAL,
    ENV_ROLE,
    ENV_WORKER_IDS,
    Principal,
    principal_from_environment,
)
from tinkops.pushpolicy import BRANCH_PREFIX, RefUpdate, check_push, parse_updates
from tinkops_agent.gitrepo import GitRepo

HOOK_NAME = "pre-receive"
DEFAULT_MAIN_BRANCH = "main"

ENV_MAIN_BRANCH = "TINKOPS_MAIN_BRANCH"
ENV_ALLOW_FORCE_PUSH_MAIN = "TINKOPS_ALLOW_FORCE_PUSH_MAIN"
ENV_AUDIT_LOG = "TINKOPS_AUDIT_LOG"
ENV_REQUIRE_SIGNED_EVENTS = "TINKOPS_REQUIRE_SIGNED_EVENTS"
ENV_AUDIT_RECORD = "TINKOPS_AUDIT_RECORD"
"""A file where the hook leaves its record for the SSH server, one per receive-pack."""
ENV_REMOTE_ADDRESS = "TINKOPS_REMOTE_ADDRESS"


@dataclass(frozen=True)
class HookSettings:
    """The provisioner's configuration that the hook needs, carried in TINKOPS_* variables."""

    main_branch: str | None = None
    """The branch operators may only fast-forward; None means the branch HEAD names."""
    allow_force_push_main: bool = False
    audit_log: Path | None = None
    require_signed_events: bool = False
    """Reject worker events that are not signed by a key of the worker's hardware record."""

    def environment(self) -> dict[str, str]:
        environment = {
            ENV_ALLOW_FORCE_PUSH_MAIN: "true" if self.allow_force_push_main else "false",
            ENV_REQUIRE_SIGNED_EVENTS: "true" if self.require_signed_events else "false",
        }
        if self.main_branch:
            environment[ENV_MAIN_BRANCH] = self.main_branch
        if self.audit_log is not None:
            environment[ENV_AUDIT_LOG] = str(self.audit_log)
        return environment

    @classmethod
    def from_environment(cls, environment: Mapping[str, str]) -> HookSettings:
        """Read the settings; anything but ``true`` leaves force pushes to main rejected."""
        audit_log = environment.get(ENV_AUDIT_LOG)
        return cls(
            main_branch=environment.get(ENV_MAIN_BRANCH) or None,
            allow_force_push_main=environment.get(ENV_ALLOW_FORCE_PUSH_MAIN) == "true",
            audit_log=Path(audit_log) if audit_log else None,
            require_signed_events=environment.get(ENV_REQUIRE_SIGNED_EVENTS) == "true",
        )


def run_hook(
    repo: GitRepo, environment: Mapping[str, str], lines: Iterable[str], stderr: TextIO
) -> int:
    """Apply the push policy to ``lines``, audit the decision, print each rejection, and
    return the exit status (0 accepts the whole push, 1 rejects it)."""
    settings = HookSettings.from_environment(environment)
    outcome = _decide(repo, environment, lines, settings)
    principal, reasons = outcome.principal, list(outcome.reasons)
    if principal is None and not reasons:
        return 0

    record = AuditRecord(
        decision=Decision.REJECTED if reasons else Decision.ACCEPTED,
        stage=Stage.POLICY,
        role=environment.get(ENV_ROLE, ""),
        principal=environment.get(ENV_PRINCIPAL, ""),
        fingerprint=environment.get(ENV_KEY_FINGERPRINT, ""),
        worker_ids=principal.worker_ids if principal else _raw_worker_ids(environment),
        remote_address=environment.get(ENV_REMOTE_ADDRESS, ""),
        refs=ref_changes((u.old, u.new, u.ref) for u in outcome.updates),
        reasons=(*reasons, *outcome.details),
    )
    try:
        if settings.audit_log is not None:
            append_record(settings.audit_log, record)
    except OSError as error:
        record = replace(
            record,
            decision=Decision.REJECTED,
            reasons=(*record.reasons, f"rejected push: writing the audit log failed: {error}"),
        )
        reasons.append(
            "rejected push: the provisioner accepts no push that it cannot record in its "
            "audit log, and writing it failed; ask the provisioner's operator"
        )
    _hand_over(record, environment.get(ENV_AUDIT_RECORD), stderr)

    for reason in reasons:
        print(f"tinkops: {_one_line(reason)}", file=stderr)
    return 1 if reasons else 0


@dataclass(frozen=True)
class _Outcome:
    """The policy's decision on one push.

    ``reasons`` are printed to the pusher. ``details`` go only to the audit record, because
    they describe the provisioner's own failures and may name its paths.
    """

    principal: Principal | None
    updates: list[RefUpdate]
    reasons: tuple[str, ...] = ()
    details: tuple[str, ...] = ()


def _decide(
    repo: GitRepo, environment: Mapping[str, str], lines: Iterable[str], settings: HookSettings
) -> _Outcome:
    try:
        principal = principal_from_environment(environment)
        updates = parse_updates(lines)
    except ValueError as error:
        return _Outcome(None, [], (f"rejected push: {error}",))
    if principal is None:
        return _Outcome(None, updates)

    try:
        branch = settings.main_branch or main_branch(repo)
        rejections = check_push(
            principal,
            repo,
            updates,
            main_branch=branch,
            allow_force_push_main=settings.allow_force_push_main,
        )
        if settings.require_signed_events and not rejections:
            # Loaded only when asked for: it reads hardware records, which costs import time.
            from tinkops.signatures import check_signed_updates

            rejections = check_signed_updates(repo, principal, updates, main_branch=branch)
    except Exception as error:
        # The hook fails closed: a git failure or a bug in the policy rejects the push.
        return _Outcome(
            principal,
            updates,
            ("rejected push: the push policy could not check it; ask the provisioner's operator",),
            (f"the push policy failed: {error!r}",),
        )
    return _Outcome(principal, updates, tuple(str(rejection) for rejection in rejections))


def _hand_over(record: AuditRecord, handoff: str | None, stderr: TextIO) -> None:
    """Leave ``record`` where the SSH server reads it after receive-pack exits."""
    if not handoff:
        return
    try:
        Path(handoff).write_text(json.dumps(record.to_dict()))
    except OSError:
        # The audit log has the record; the server only misses it for its log line.
        print("tinkops: note: the push decision could not be passed to the server", file=stderr)


def _raw_worker_ids(environment: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(item for item in environment.get(ENV_WORKER_IDS, "").split(",") if item)


def main_branch(repo: GitRepo) -> str:
    """Return the branch HEAD names in the served repository: the main branch."""
    result = repo.execute("symbolic-ref", "--quiet", "HEAD")
    ref = result.stdout.decode().strip()
    if result.returncode != 0 or not ref.startswith(BRANCH_PREFIX):
        return DEFAULT_MAIN_BRANCH
    return ref.removeprefix(BRANCH_PREFIX)


def install_hooks(repository: Path, python: str = sys.executable) -> Path:
    """Write the repository's ``hooks/pre-receive`` so it runs this module with ``python``.

    ``python`` must be an interpreter that can import tinkops. Returns the hook's path.
    """
    hooks = repository / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    script = (
        "#!/bin/sh\n"
        "# Written by tinkops: checks every push against the push policy.\n"
        f"exec {shlex.quote(python)} -m tinkops.prereceive\n"
    )
    path = hooks / HOOK_NAME
    # Write beside the hook and rename, so git never runs a half-written script.
    partial = hooks / f".{HOOK_NAME}.tmp"
    partial.write_text(script)
    partial.chmod(0o755)
    partial.replace(path)
    return path


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main() -> int:
    # git runs the hook with the repository as its working directory and GIT_DIR set.
    repo = GitRepo(Path(os.environ.get("GIT_DIR", ".")).resolve())
    return run_hook(repo, os.environ, sys.stdin, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
