"""SSH signatures on event commits: proof of which worker wrote an event, on any git server.

An agent signs each event commit with its SSH key in git's SSH signature format (a
``gpgsig`` header holding an armored ``ssh-keygen -Y sign -n git`` signature over the commit
without that header). The provisioner checks each event against the keys that the hardware
record of the worker named in the event lists under ``agent.keys``, through an allowed-signers
file (principal: the hardware record's name) and ``ssh-keygen -Y verify``. Events that the
reconciler writes itself (a global timeout, a cancel) are checked against the reconciler's own
key, under the principal ``RECONCILER_PRINCIPAL``.

The embedded server can reject unsigned pushes in its pre-receive hook
(``check_signed_updates``). On an external git server nothing runs at push time, so the remote
reconciler checks every new commit of a workflow ref afterwards (``EventVerifier``) and treats
a ref as valid only up to its first invalid commit.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tinkops.errors import ConfigError
from tinkops.hardware import Hardware
from tinkops.identities import Principal, Role
from tinkops.pushpolicy import RefUpdate, Rejection, check_push
from tinkops.repository import SnapshotReader
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import (
    WORKFLOW_ID_PATTERN,
    WORKFLOW_REF_PREFIX,
    EventKind,
    ProtocolError,
    canonical_worker,
    parse_event_message,
)

log = logging.getLogger(__name__)

NAMESPACE = "git"
"""The signature namespace git uses for commits (``ssh-keygen -Y sign -n git``)."""
RECONCILER_PRINCIPAL = "reconciler@tinkops"
"""The principal of the reconciler's keys; the '@' keeps it apart from every hardware name."""

_SIGNATURE_HEADERS = (b"gpgsig", b"gpgsig-sha256")
_SSH_ARMOR = b"-----BEGIN SSH SIGNATURE-----"


@dataclass(frozen=True)
class Signer:
    """One principal of the allowed-signers file: its name, the worker ids it acts as, its keys."""

    principal: str
    keys: tuple[str, ...]
    worker_ids: tuple[str, ...] = ()


@dataclass
class AllowedSigners:
    """The keys that may sign events, by principal, and which principal each worker id has."""

    signers: dict[str, Signer] = field(default_factory=dict)
    by_worker: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, signers: Iterable[Signer]) -> AllowedSigners:
        allowed = cls()
        for signer in signers:
            keys = tuple(" ".join(key.split()[:2]) for key in signer.keys if len(key.split()) >= 2)
            if not keys:
                continue
            allowed.signers[signer.principal] = Signer(signer.principal, keys, signer.worker_ids)
            for worker in signer.worker_ids:
                allowed.by_worker[canonical_worker(worker)] = signer.principal
        return allowed

    @classmethod
    def from_hardware(
        cls, records: Mapping[str, Hardware], reconciler_keys: Sequence[str] = ()
    ) -> AllowedSigners:
        """Build the signers from hardware records (``agent.keys``) and the reconciler's keys."""
        signers = [
            Signer(record.name, tuple(record.agent_keys), record.worker_ids)
            for record in records.values()
        ]
        if reconciler_keys:
            signers.append(Signer(RECONCILER_PRINCIPAL, tuple(reconciler_keys)))
        return cls.build(signers)

    def principal_of(self, worker: str) -> str | None:
        """Return the principal whose keys sign the events of ``worker``, if any."""
        return self.by_worker.get(canonical_worker(worker))

    def text(self) -> str:
        """Return the allowed-signers file: one ``principal namespaces="git" key`` per key."""
        lines = [
            f'{signer.principal} namespaces="{NAMESPACE}" {key}\n'
            for signer in sorted(self.signers.values(), key=lambda item: item.principal)
            for key in signer.keys
        ]
        return "".join(lines)


def public_key_of(private_key: Path) -> str:
    """Return the public key line of an OpenSSH private key file (``ssh-keygen -y``)."""
    result = _ssh_keygen(["-y", "-f", str(private_key)])
    if result.returncode != 0:
        raise ConfigError(
            f"cannot read the SSH key {private_key}: {result.stderr.decode(errors='replace')}"
            "; pass a private key file without a passphrase"
        )
    return result.stdout.decode().strip()


def split_signature(raw_commit: bytes) -> tuple[bytes, bytes | None]:
    """Split a raw commit object into the signed payload and its signature (None: unsigned).

    The payload is the commit without its ``gpgsig`` header, and git signs exactly that text.
    The header's value continues on the following lines that start with a space.
    """
    header, separator, message = raw_commit.partition(b"\n\n")
    kept: list[bytes] = []
    signature: list[bytes] | None = None
    in_signature = False
    for line in header.split(b"\n"):
        if in_signature and line.startswith(b" "):
            assert signature is not None
            signature.append(line[1:])
            continue
        in_signature = False
        name = line.split(b" ", 1)[0]
        if name in _SIGNATURE_HEADERS and signature is None:
            signature = [line[len(name) + 1 :]]
            in_signature = True
            continue
        kept.append(line)
    payload = b"\n".join(kept) + separator + message
    return payload, None if signature is None else b"\n".join(signature) + b"\n"


class SignatureChecker:
    """Runs ``ssh-keygen -Y verify`` against an allowed-signers file kept in ``scratch``."""

    def __init__(self, signers: AllowedSigners, scratch: Path) -> None:
        self.signers = signers
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=scratch, prefix="allowed-signers-")
        with open(descriptor, "w") as stream:
            stream.write(signers.text())
        self.allowed_signers = Path(name)

    def close(self) -> None:
        self.allowed_signers.unlink(missing_ok=True)

    def verify(self, payload: bytes, signature: bytes, principal: str) -> str | None:
        """Return None when ``signature`` over ``payload`` is ``principal``'s, else the reason."""
        if not signature.lstrip().startswith(_SSH_ARMOR):
            return "is signed, but not with an SSH key (gpg.format=ssh)"
        with tempfile.NamedTemporaryFile(dir=self.scratch, prefix="signature-") as stream:
            stream.write(signature)
            stream.flush()
            result = _ssh_keygen(
                [
                    "-Y",
                    "verify",
                    "-f",
                    str(self.allowed_signers),
                    "-I",
                    principal,
                    "-n",
                    NAMESPACE,
                    "-s",
                    stream.name,
                ],
                payload,
            )
        if result.returncode == 0:
            return None
        return f"has a signature that no key of {principal} made (another worker's key?)"


def _ssh_keygen(
    args: list[str], payload: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            ["ssh-keygen", *args], input=payload, capture_output=True, check=False, timeout=30
        )
    except FileNotFoundError as error:
        raise ConfigError(
            "ssh-keygen is not installed; signature checks need the OpenSSH client"
        ) from error


@dataclass(frozen=True)
class InvalidEvent:
    """A commit of a workflow ref that is not a validly signed event, and why."""

    workflow: str
    commit: str
    reason: str

    def __str__(self) -> str:
        return f"commit {self.commit[:12]} {self.reason}"


@dataclass(frozen=True)
class RefVerdict:
    """The result of checking a workflow ref: the last commit that is valid, and what is not."""

    workflow: str
    tip: str
    last_valid: str
    invalid: InvalidEvent | None = None


class EventVerifier:
    """Checks the event commits of workflow refs in ``repo`` against ``signers``.

    With ``check_policy`` each worker event must also pass the push policy as if its worker
    had pushed it (one action's own state, the workflow's files untouched). On a server that
    runs no policy, a signature alone does not stop a worker from changing another's action.
    """

    def __init__(
        self, repo: GitRepo, signers: AllowedSigners, scratch: Path, *, check_policy: bool = True
    ) -> None:
        self.repo = repo
        self.signers = signers
        self.checker = SignatureChecker(signers, scratch)
        self.check_policy = check_policy

    def close(self) -> None:
        self.checker.close()

    def verify_ref(self, workflow: str, tip: str, since: str | None = None) -> RefVerdict:
        """Check the commits of ``workflow`` after ``since`` (a commit known valid) up to ``tip``.

        Without ``since``, the check starts after the root commit, which contains the rendered
        definition. The first invalid commit ends the check, because every later commit's state
        builds on it.
        """
        span = f"{since}..{tip}" if since else tip
        history = [
            line.split()
            for line in self.repo.text("rev-list", "--reverse", "--parents", span).splitlines()
        ]
        if not since and history:
            first, *parents = history.pop(0)
            if parents:
                problem = "should be the root commit of the workflow, but it has parents"
                return RefVerdict(workflow, tip, first, InvalidEvent(workflow, first, problem))
            since = first
        last_valid = since or tip
        raws = self.repo.read_blobs([commit for commit, *_parents in history])
        for commit, *parents in history:
            reason = self._check_commit(workflow, commit, parents, raws[commit])
            if reason is not None:
                return RefVerdict(workflow, tip, last_valid, InvalidEvent(workflow, commit, reason))
            last_valid = commit
        return RefVerdict(workflow, tip, last_valid)

    def _check_commit(
        self, workflow: str, commit: str, parents: list[str], raw: bytes
    ) -> str | None:
        if len(parents) != 1:
            return f"has {len(parents)} parents; workflow history is one event per commit"
        payload, signature = split_signature(raw)
        message = payload.partition(b"\n\n")[2].decode("utf-8", errors="replace")
        try:
            event = parse_event_message(message)
        except ProtocolError as error:
            return f"records no valid event: {error}"
        if event is None:
            return "carries no event trailers (Tinkops-Event, Workflow, Worker, ...)"
        if event.workflow != workflow:
            return f"records an event of workflow {event.workflow!r}"

        reconciler_event = event.kind is EventKind.WORKFLOW and not event.worker
        principal = (
            RECONCILER_PRINCIPAL if reconciler_event else self.signers.principal_of(event.worker)
        )
        if principal is None or principal not in self.signers.signers:
            return f"names worker {event.worker!r}, but no hardware record lists agent keys for it"
        if signature is None:
            return "is not signed; agents sign events with --sign-events"
        reason = self.checker.verify(payload, signature, principal)
        if reason is not None or reconciler_event or not self.check_policy:
            return reason
        return self._policy_reason(workflow, principal, parents[0], commit)

    def _policy_reason(self, workflow: str, principal: str, parent: str, commit: str) -> str | None:
        signer = self.signers.signers[principal]
        pusher = Principal(Role.WORKER, principal, "", signer.worker_ids)
        update = RefUpdate(parent, commit, WORKFLOW_REF_PREFIX + workflow)
        rejections = check_push(pusher, self.repo, [update])
        if not rejections:
            return None
        return "breaks the push policy: " + "; ".join(item.reason for item in rejections)


def signers_at(repo: GitRepo, commit: str, reconciler_keys: Sequence[str] = ()) -> AllowedSigners:
    """Return the signers that the hardware records at ``commit`` of the main branch define."""
    snapshot = SnapshotReader(repo).read(commit)
    return AllowedSigners.from_hardware(snapshot.hardware, reconciler_keys)


def check_signed_updates(
    repo: GitRepo,
    principal: Principal,
    updates: Sequence[RefUpdate],
    *,
    main_branch: str = "main",
    scratch: Path | None = None,
) -> list[Rejection]:
    """Return a rejection for each worker ref update whose new commits are not all events
    signed by the keys of the hardware record they name (empty: every commit is signed).

    Meant for the embedded server's pre-receive hook, after ``check_push``: operators' pushes
    and updates that create or delete refs are left to the push policy.
    """
    if principal.role is not Role.WORKER:
        return []
    checked = [
        update
        for update in updates
        if update.ref.startswith(WORKFLOW_REF_PREFIX)
        and not update.creates
        and not update.deletes
        and WORKFLOW_ID_PATTERN.match(update.ref.removeprefix(WORKFLOW_REF_PREFIX))
    ]
    if not checked:
        return []
    main = repo.rev_parse(f"refs/heads/{main_branch}")
    if main is None:
        return [Rejection(update.ref, f"branch {main_branch} not found") for update in checked]
    rejections = []
    with tempfile.TemporaryDirectory(dir=scratch, prefix="tinkops-signatures-") as folder:
        verifier = EventVerifier(repo, signers_at(repo, main), Path(folder), check_policy=False)
        for update in checked:
            workflow = update.ref.removeprefix(WORKFLOW_REF_PREFIX)
            verdict = verifier.verify_ref(workflow, update.new, update.old)
            if verdict.invalid is not None:
                rejections.append(Rejection(update.ref, f"{verdict.invalid}"))
        verifier.close()
    return rejections
