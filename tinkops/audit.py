"""The push audit trail: one record per push, as a JSON line and as a log line.

The pre-receive hook writes a record for every push it decides, before any ref moves. The SSH
server writes one for a push that receive-pack rejected before the hook could run (a pack over
the size limit, objects that fail fsck, a client that hung up mid-pack). Records go to the
audit log file, one JSON object per line, and to the ``tinkops.audit`` logger.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

AUDIT_LOGGER = "tinkops.audit"

# Values of the log line that contain none of these characters are written without quotes.
_PLAIN_VALUE_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:/_+-,@"
)


class Decision(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class Stage(enum.Enum):
    """The step of a push at which the decision was made."""

    POLICY = "policy"
    """The pre-receive hook applied the push policy."""
    RECEIVE_PACK = "receive-pack"
    """receive-pack failed before the hook ran, so the policy never saw the push."""


@dataclass(frozen=True)
class RefChange:
    """One ref update a push requested: ``old`` and ``new`` are object ids (zeros: none)."""

    ref: str
    old: str
    new: str


@dataclass(frozen=True)
class AuditRecord:
    """The audit record of one push: the ref updates requested, the pusher, the decision."""

    decision: Decision
    stage: Stage
    role: str
    principal: str
    fingerprint: str
    refs: tuple[RefChange, ...]
    reasons: tuple[str, ...] = ()
    worker_ids: tuple[str, ...] = ()
    remote_address: str = ""
    time: str = field(default_factory=lambda: _utc_now())

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "decision": self.decision.value,
            "stage": self.stage.value,
            "role": self.role,
            "principal": self.principal,
            "fingerprint": self.fingerprint,
            "worker_ids": list(self.worker_ids),
            "remote_address": self.remote_address,
            "refs": [{"ref": c.ref, "old": c.old, "new": c.new} for c in self.refs],
            "reasons": list(self.reasons),
        }

    def to_json(self) -> str:
        """Return the record as one line of JSON; newlines inside values are escaped."""
        return json.dumps(self.to_dict(), ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """Read a record written by ``to_dict``. Raises ValueError, KeyError or TypeError."""
        return cls(
            decision=Decision(data["decision"]),
            stage=Stage(data["stage"]),
            role=str(data["role"]),
            principal=str(data["principal"]),
            fingerprint=str(data["fingerprint"]),
            refs=tuple(
                RefChange(str(item["ref"]), str(item["old"]), str(item["new"]))
                for item in data["refs"]
            ),
            reasons=tuple(str(reason) for reason in data["reasons"]),
            worker_ids=tuple(str(worker) for worker in data["worker_ids"]),
            remote_address=str(data["remote_address"]),
            time=str(data["time"]),
        )

    def log_line(self) -> str:
        """Return the record as ``key=value`` pairs, with values quoted where needed."""
        pairs = [
            ("stage", self.stage.value),
            ("role", self.role),
            ("principal", self.principal),
            ("fingerprint", self.fingerprint),
            ("remote", self.remote_address),
            ("refs", ",".join(change.ref for change in self.refs)),
        ]
        if self.reasons:
            pairs.append(("reasons", " | ".join(self.reasons)))
        text = " ".join(f"{key}={_quote(value)}" for key, value in pairs)
        return f"push {self.decision.value} {text}"


def append_record(path: Path, record: AuditRecord) -> None:
    """Append ``record`` to the audit log at ``path`` as one JSON line.

    Several hooks and the server may append at the same time. Each record is written with one
    ``write`` on a file opened with O_APPEND, under an exclusive ``flock``, so records never
    interleave, whatever their size. The file is created with mode 0600. Raises OSError.
    """
    line = (record.to_json() + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
    finally:
        # Closing the descriptor releases the lock.
        os.close(descriptor)


def read_records(path: Path) -> list[AuditRecord]:
    """Return every record of an audit log, oldest first. Raises ValueError on a bad line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(AuditRecord.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not an audit record: {error}") from error
    return records


def log_record(record: AuditRecord) -> None:
    """Log ``record`` on the ``tinkops.audit`` logger: INFO when accepted, WARNING when not.

    The record's fields are also attached as ``record.audit`` for structured log handlers.
    """
    level = logging.INFO if record.decision is Decision.ACCEPTED else logging.WARNING
    logging.getLogger(AUDIT_LOGGER).log(
        level, "%s", record.log_line(), extra={"audit": record.to_dict()}
    )


def ref_changes(updates: Iterable[tuple[str, str, str]]) -> tuple[RefChange, ...]:
    """Return ``(old, new, ref)`` triples, in the order git's hooks list them, as RefChanges."""
    return tuple(RefChange(ref, old, new) for old, new, ref in updates)


def _quote(value: str) -> str:
    if value and set(value) <= _PLAIN_VALUE_CHARACTERS:
        return value
    return json.dumps(value, ensure_ascii=True)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
