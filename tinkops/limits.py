"""Limits on what SSH clients can make the provisioner do, read from ``config.yaml``.

This module imports nothing heavy, so the CLI can load a configuration without paramiko.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tinkops.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on the SSH endpoint's connections, git commands and pushes.

    NOTE: the defaults are starting points, not measurements. ``max_auth_attempts`` follows
    OpenSSH's MaxAuthTries (6), ``max_channels_per_connection`` its MaxSessions (10), and
    ``login_timeout`` is shorter than its LoginGraceTime (120 s). The others are estimates:
    an agent runs one git command at a time, each on a new connection, and a worker's push
    carries at most one workflow's events and 10 MiB of ephemeral data per commit.
    """

    max_connections: int = 256
    """Maximum open connections, authenticated or not. Further connections are closed at once."""

    max_connections_per_key: int = 16
    """Maximum authenticated connections open with one key at the same time."""

    max_sessions_per_key: int = 8
    """Maximum git commands that one key runs at the same time, over all its connections."""

    max_channels_per_connection: int = 10
    """Maximum open session channels on one connection."""

    max_auth_attempts: int = 6
    """Failed authentication attempts after which a connection is closed."""

    login_timeout: float = 30.0
    """Seconds a client has to authenticate after connecting."""

    idle_timeout: float = 300.0
    """Seconds without data after which a git command is ended and an idle connection closed."""

    max_connection_time: float = 3600.0
    """Seconds after which a connection is closed, and its git commands ended, whatever it does."""

    max_pack_size: int = 64 * MIB
    """Maximum size in bytes of the pack one push sends (git's ``receive.maxInputSize``)."""

    def to_mapping(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> ServerLimits:
        """Read limits from a mapping; missing keys keep their defaults.

        Raises ConfigError, naming ``source`` and the key, for an unknown key or a value that
        is not a positive number (a positive integer for counts and sizes).
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: unknown limits {', '.join(map(str, unknown))} "
                f"(known: {', '.join(fields)})"
            )
        values: dict[str, int | float] = {}
        for name, value in data.items():
            integral = fields[name].type in ("int", int)
            values[name] = _positive_number(value, integral, f"{source}: limits.{name}")
        return cls(**values)  # type: ignore[arg-type]


def _positive_number(value: object, integral: bool, where: str) -> int | float:
    # bool is a subclass of int, but "true" is never a meaningful limit.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} is {value!r}; expected a positive number")
    if integral and not isinstance(value, int):
        raise ConfigError(f"{where} is {value!r}; expected a positive whole number")
    if value <= 0:
        raise ConfigError(f"{where} is {value!r}; expected a number greater than 0")
    return value if integral else float(value)
