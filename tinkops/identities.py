"""Who is on the other end of an SSH connection: operators and workers, known by their keys.

The SSH server looks up the Principal behind a public key in a KeyDirectory. The principal then
travels to the pre-receive hook as environment variables (see ``principal_environment``), so
the push policy sees the same identity that authenticated.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tinkops.errors import TinkopsError
from tinkops_agent.protocol import canonical_worker

# paramiko and cryptography are imported by the functions that use them: together they take
# about 0.2 s to import, and the pre-receive hook, which starts on every push, needs only the
# principal types of this module.
if TYPE_CHECKING:
    import paramiko

ENV_ROLE = "TINKOPS_ROLE"
ENV_PRINCIPAL = "TINKOPS_PRINCIPAL"
ENV_WORKER_IDS = "TINKOPS_WORKER_IDS"
ENV_KEY_FINGERPRINT = "TINKOPS_KEY_FINGERPRINT"


class Role(enum.Enum):
    """The kind of principal: operators push branches, and workers push their workflows' events."""

    OPERATOR = "operator"
    WORKER = "worker"


@dataclass(frozen=True)
class Principal:
    """The identity behind one SSH key.

    ``worker_ids`` are the canonical ids (lower-case, colon-separated MACs, or configured
    names) that a worker may act as. Operators have none.
    """

    role: Role
    name: str
    fingerprint: str
    worker_ids: tuple[str, ...] = ()


class KeyDirectory(Protocol):
    """The seam the SSH server authenticates against."""

    def lookup(self, key: paramiko.PKey) -> Principal | None:
        """Return the principal that owns ``key``, or None for an unknown key."""
        ...


class InvalidPublicKey(TinkopsError, ValueError):
    """A public key line is not in OpenSSH's ``<type> <base64> [comment]`` format."""


def fingerprint_of_blob(blob: bytes) -> str:
    """Return the SHA256 fingerprint of a public key blob, as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_fingerprint(key: paramiko.PKey) -> str:
    """Return the OpenSSH SHA256 fingerprint of ``key``."""
    return fingerprint_of_blob(key.asbytes())


def parse_public_key(line: str) -> paramiko.PKey:
    """Parse one OpenSSH public key line (``ssh-ed25519 AAAA... comment``) into a key.

    Raises InvalidPublicKey when the line is malformed or paramiko does not support the type.
    """
    fields = line.split()
    if len(fields) < 2:
        raise InvalidPublicKey(
            f"{line[:40]!r} is not an OpenSSH public key "
            "(expected '<type> <base64> [comment]', one line of a .pub file)"
        )
    import paramiko
    from paramiko.pkey import UnknownKeyType

    key_type, encoded = fields[0], fields[1]
    try:
        blob = base64.b64decode(encoded, validate=True)
    except binascii.Error as error:
        raise InvalidPublicKey(
            f"the {key_type} key {encoded[:20]!r}... is not valid base64: {error}"
        ) from error
    try:
        key = paramiko.PKey.from_type_string(key_type, blob)
    except (paramiko.SSHException, UnknownKeyType, ValueError, TypeError) as error:
        raise InvalidPublicKey(
            f"the {key_type} key {encoded[:20]!r}... cannot be loaded: {error}"
        ) from error
    if key.asbytes() != blob:
        raise InvalidPublicKey(f"the key {encoded[:20]!r}... does not match its type {key_type}")
    return key


class StaticKeyDirectory:
    """A fixed set of keys, for tests and for operators' keys configured on the provisioner.

    Each principal's fingerprint is filled in from its key when empty, and a non-empty one must
    match the key. Worker ids are stored in their canonical form.
    """

    def __init__(self, entries: Iterable[tuple[Principal, str]]) -> None:
        self._by_blob: dict[bytes, Principal] = {}
        for principal, line in entries:
            key = parse_public_key(line)
            fingerprint = key_fingerprint(key)
            if principal.fingerprint and principal.fingerprint != fingerprint:
                raise ValueError(
                    f"principal {principal.name!r} names fingerprint {principal.fingerprint} "
                    f"but its key has fingerprint {fingerprint}"
                )
            blob = key.asbytes()
            if blob in self._by_blob:
                raise ValueError(
                    f"key {fingerprint} is listed for both {self._by_blob[blob].name!r} "
                    f"and {principal.name!r}; give each principal its own key"
                )
            worker_ids = tuple(canonical_worker(worker) for worker in principal.worker_ids)
            self._by_blob[blob] = replace(principal, fingerprint=fingerprint, worker_ids=worker_ids)

    def lookup(self, key: paramiko.PKey) -> Principal | None:
        return self._by_blob.get(key.asbytes())


def generate_ed25519_key(private_key_path: Path, comment: str = "") -> str:
    """Create an Ed25519 key pair and return the public key line.

    The private key is written to ``private_key_path`` in OpenSSH format, unencrypted, with mode
    0600, so both ``ssh -i`` and paramiko load it. An existing file is never overwritten
    (FileExistsError).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    descriptor = os.open(private_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        # The umask may clear bits of 0600 at creation, so set the mode explicitly.
        os.fchmod(stream.fileno(), 0o600)
        stream.write(pem)

    public = private_key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH,
        format=serialization.PublicFormat.OpenSSH,
    )
    line = public.decode("ascii")
    return f"{line} {comment}" if comment else line


def principal_environment(principal: Principal) -> dict[str, str]:
    """Return the environment variables that carry ``principal`` to the pre-receive hook."""
    return {
        ENV_ROLE: principal.role.value,
        ENV_PRINCIPAL: principal.name,
        ENV_WORKER_IDS: ",".join(principal.worker_ids),
        ENV_KEY_FINGERPRINT: principal.fingerprint,
    }


def principal_from_environment(environment: Mapping[str, str]) -> Principal | None:
    """Return the principal that ``principal_environment`` wrote, or None when there is none.

    No role means the push did not come through the SSH server (for example a local push on
    the provisioner). Raises ValueError for a role that is not ``operator`` or ``worker``.
    """
    role_text = environment.get(ENV_ROLE)
    if role_text is None:
        return None
    try:
        role = Role(role_text)
    except ValueError:
        roles = ", ".join(role.value for role in Role)
        raise ValueError(
            f"{ENV_ROLE}={role_text!r} is not a role (expected one of {roles})"
        ) from None

    worker_ids = tuple(
        canonical_worker(item.strip())
        for item in environment.get(ENV_WORKER_IDS, "").split(",")
        if item.strip()
    )
    return Principal(
        role=role,
        name=environment.get(ENV_PRINCIPAL, ""),
        fingerprint=environment.get(ENV_KEY_FINGERPRINT, ""),
        worker_ids=worker_ids,
    )
