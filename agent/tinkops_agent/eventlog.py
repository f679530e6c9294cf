"""Reading and appending to a workflow ref: one event, one commit."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from tinkops_agent.gitrepo import GitRepo, Identity, TreeEntry
from tinkops_agent.protocol import (
    EPHEMERAL_DIR,
    STATE_FILE,
    WORKFLOW_FILE,
    Event,
    ProtocolError,
    Workflow,
    WorkflowStatus,
    format_event_message,
    parse_event_message,
)

# libyaml's loader when PyYAML has it, else the pure-Python safe loader.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    """Return the POSIX time of a UTC timestamp written by ``utc_now`` (or with microseconds)."""
    text = text.rstrip("Z")
    layout = "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S"
    return datetime.strptime(text, layout).replace(tzinfo=UTC).timestamp()


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class WorkflowHead:
    """A workflow read at one commit of its ref."""

    commit: str
    workflow: Workflow
    status: WorkflowStatus


def read_head(repo: GitRepo, commit: str) -> WorkflowHead:
    """Read the definition and state stored at ``commit`` of a workflow ref."""
    return read_heads(repo, [commit])[commit]


def read_heads(repo: GitRepo, commits: list[str]) -> dict[str, WorkflowHead]:
    """Read many workflow heads with one ``git cat-file``; raise ProtocolError on a bad one."""
    names = [f"{c}:{name}" for c in commits for name in (WORKFLOW_FILE, STATE_FILE)]
    contents = repo.read_objects(names)
    heads = {}
    for commit in commits:
        definition = contents[f"{commit}:{WORKFLOW_FILE}"]
        state = contents[f"{commit}:{STATE_FILE}"]
        if definition is None or state is None:
            raise ProtocolError(f"commit {commit[:12]} has no {WORKFLOW_FILE} or {STATE_FILE}")
        heads[commit] = WorkflowHead(
            commit, parse_definition(definition, commit), WorkflowStatus.from_json(state)
        )
    return heads


def parse_definition(definition: bytes, commit: str) -> Workflow:
    try:
        data = yaml.load(definition.decode(), Loader=_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        raise ProtocolError(f"{WORKFLOW_FILE} at {commit[:12]} is unreadable: {error}") from error
    # The definition is written with quoted strings, so the safe loader keeps values as text.
    return Workflow.from_dict(data)


def read_ephemeral(repo: GitRepo, commit: str) -> dict[str, bytes]:
    """Return every ephemeral data file at ``commit``, by its path under /workflow."""
    files = repo.list_files(commit, EPHEMERAL_DIR)
    blobs = repo.read_blobs(list(files.values()))
    prefix = EPHEMERAL_DIR + "/"
    return {path[len(prefix) :]: blobs[sha] for path, sha in files.items()}


def append_event(
    repo: GitRepo,
    parent: str,
    status: WorkflowStatus,
    event: Event,
    identity: Identity,
    ephemeral: Mapping[str, bytes] | None = None,
    *,
    signing_key: Path | None = None,
) -> str:
    """Write the commit recording ``event`` on top of ``parent`` and return its id.

    ``ephemeral`` replaces the whole ephemeral data folder; None keeps the parent's.
    ``signing_key`` signs the commit with that SSH private key (git's SSH signature format).
    No ref moves here: the caller publishes the commit with a compare-and-swap.
    """
    replacements: dict[str, TreeEntry | None] = {
        STATE_FILE: TreeEntry("100644", "blob", repo.write_blob(status.to_json().encode())),
    }
    if ephemeral is not None:
        if ephemeral:
            tree = repo.write_tree({f"{name}": data for name, data in ephemeral.items()})
            replacements[EPHEMERAL_DIR] = TreeEntry("040000", "tree", tree)
        else:
            replacements[EPHEMERAL_DIR] = None
    root = repo.write_root(parent, replacements)
    return repo.commit_tree(
        root, [parent], format_event_message(event), identity, signing_key=signing_key
    )


def read_events(repo: GitRepo, ref: str) -> list[tuple[str, Event]]:
    """Return ``(commit, event)`` for every event on a workflow ref, oldest first."""
    events = []
    for entry in repo.log(ref, reverse=True):
        event = parse_event_message(entry.message)
        if event is not None:
            events.append((entry.commit, event))
    return events
