"""Log output for the long-running provisioner: readable text, or one JSON object per line.

Log calls name the ids involved through ``extra`` (``workflow``, ``worker``, ``commit``,
``request``, ``principal``, ``fingerprint``); the JSON format puts them in fields of their
own, so a log pipeline can filter by workflow without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

ID_FIELDS = ("workflow", "worker", "commit", "request", "principal", "fingerprint")


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object: time, level, logger, message, ids, error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(*, verbose: bool = False, json_format: bool = False) -> None:
    """Send the provisioner's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # These libraries report every connection and file event; keep them for real problems.
    for noisy in ("paramiko.transport", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
