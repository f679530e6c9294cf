"""The audit log: records that survive concurrent writers, and log lines that stay one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinkops.audit import AuditRecord, Decision, RefChange, Stage, append_record, read_records

# Each writer appends records larger than PIPE_BUF (4096 bytes on Linux). POSIX makes pipe
# writes up to that size atomic, but promises nothing for regular files.
WRITER = """
import sys
from pathlib import Path
from tinkops.audit import AuditRecord, Decision, RefChange, Stage, append_record

path, writer, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for index in range(count):
    record = AuditRecord(
        decision=Decision.REJECTED,
        stage=Stage.POLICY,
        role="worker",
        principal=f"writer-{writer}",
        fingerprint="SHA256:x",
        refs=(RefChange("refs/tinkops/workflows/w", "0" * 40, "1" * 40),),
        reasons=(f"{writer}-{index}-" + writer * 20_000,),
    )
    append_record(path, record)
"""


def record(**changes: object) -> AuditRecord:
    fields: dict[str, object] = {
        "decision": Decision.REJECTED,
        "stage": Stage.POLICY,
        "role": "worker",
        "principal": "machine1",
        "fingerprint": "SHA256:abc+/def",
        "refs": (RefChange("refs/heads/main", "0" * 40, "1" * 40),),
        "reasons": ("rejected refs/heads/main: workers may push only to refs/tinkops/",),
        "worker_ids": ("08:00:27:00:00:01",),
        "remote_address": "127.0.0.1:4000",
    }
    fields.update(changes)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writers, count = 6, 40

    processes = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(writer), str(count)])
        for writer in "abcdef"[:writers]
    ]
    for process in processes:
        assert process.wait(timeout=60) == 0

    records = read_records(path)
    assert len(records) == writers * count
    for writer in "abcdef"[:writers]:
        reasons = [r.reasons[0] for r in records if r.principal == f"writer-{writer}"]
        assert len(reasons) == count
        # Each writer's records arrive whole and in its own order.
        prefixes = [reason.split("-")[1] for reason in reasons]
        assert prefixes == [str(index) for index in range(count)]
        assert all(reason.endswith(writer * 20_000) for reason in reasons)


def test_record_round_trips_as_one_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    original = record(reasons=("line one\nline two \x1b[31m", 'quote " and \\'))

    append_record(path, original)
    append_record(path, original)

    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["reasons"] == list(original.reasons)
    assert read_records(path) == [original, original]


def test_log_line_quotes_untrusted_text() -> None:
    line = record(reasons=("bad\nnews = yes",), remote_address="127.0.0.1:4000").log_line()

    assert line.startswith("push rejected stage=policy role=worker principal=machine1 ")
    assert "fingerprint=SHA256:abc+/def" in line
    assert "refs=refs/heads/main" in line
    assert 'reasons="bad\\nnews = yes"' in line
    assert "\n" not in line


def test_read_records_names_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    append_record(path, record())
    with path.open("a") as stream:
        stream.write("{not json\n")

    with pytest.raises(ValueError, match=r"audit\.log:2"):
        read_records(path)
