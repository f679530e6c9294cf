"""Keeping a snapshot of the main branch up to date from one commit to the next.

A full read lists every file of the tree (``ls-tree``), which grows with the repository.
``IncrementalReader`` reads fully once, then applies only what ``git diff-tree`` reports
between the last commit it read and the new one, so reconciling a push that adds one request
costs the same with ten files as with a hundred thousand. It works across rewrites of main
too, because it compares trees, not history.

It gives the same snapshot a full read gives; tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinkops.errors import Problem
from tinkops.hardware import find_duplicate_ids, index_by_worker
from tinkops.repository import (
    FOLDERS,
    HARDWARE_DIR,
    TEMPLATES_DIR,
    WORKFLOWS_DIR,
    CommitSource,
    Entry,
    EntryKind,
    Snapshot,
    _add,
    _find_duplicate_template_names,
    _parse_guarded,
    _select,
    _stem,
)
from tinkops_agent.gitrepo import SYMLINK_MODE, GitError, GitRepo

Name = tuple[str, str]


@dataclass
class _State:
    """Everything a full read derived, indexed so one changed path can be replaced."""

    snapshot: Snapshot
    entries: dict[str, Entry] = field(default_factory=dict)
    by_name: dict[Name, set[str]] = field(default_factory=dict)
    parsed: dict[str, tuple[str, Any, list[Problem]]] = field(default_factory=dict)
    """Selected path: (blob id, record, problems of the file)."""
    skipped: dict[str, Problem] = field(default_factory=dict)
    troubled: set[str] = field(default_factory=set)
    """Parsed paths whose file has problems, so gathering them never scans every file."""
    cross: list[Problem] = field(default_factory=list)


def _name(path: str) -> Name:
    return (path.partition("/")[0], _stem(path))


class IncrementalReader:
    """Reads snapshots of ``repo``'s main branch, incrementally after the first."""

    def __init__(self, repo: GitRepo) -> None:
        self.repo = repo
        self._state: _State | None = None
        self.full_reads = 0
        self.changed: set[str] | None = None
        """Paths the last read changed, or None after a full read (everything is new)."""

    def read(self, commit: str) -> Snapshot:
        state = self._state
        if state is not None and state.snapshot.commit == commit:
            self.changed = set()
            return state.snapshot
        if state is not None:
            try:
                changes = self._changes(state.snapshot.commit, commit)
            except GitError:
                changes = None  # The old commit is gone (gc after a rewrite): read fully.
            if changes is not None:
                self._apply(state, commit, changes)
                self.changed = set(changes)
                return state.snapshot
        self.changed = None
        self._state = self._read_fully(commit)
        return self._state.snapshot

    # --- full read --------------------------------------------------------------------------

    def _read_fully(self, commit: str) -> _State:
        self.full_reads += 1
        source = CommitSource(self.repo, commit)
        entries = source.entries()
        state = _State(snapshot=Snapshot(commit=commit), entries=entries)
        for path in entries:
            state.by_name.setdefault(_name(path), set()).add(path)
        self._reselect(state, {name: set() for name in state.by_name})
        self._finish(state, hardware_changed=True, templates_changed=True)
        return state

    # --- incremental update -----------------------------------------------------------------

    def _changes(self, old: str, new: str) -> dict[str, Entry | None]:
        """Return every changed path under the record folders: its new entry, or None."""
        out = self.repo.run(
            "diff-tree", "-r", "-z", "--no-renames", "--raw", old, new, "--", *FOLDERS
        )
        fields = out.split(b"\0")
        changes: dict[str, Entry | None] = {}
        blobs: dict[str, str] = {}
        for index in range(0, len(fields) - 1, 2):
            meta, raw_path = fields[index].decode(), fields[index + 1]
            _old_mode, new_mode, _old_sha, new_sha, status = meta.lstrip(":").split()
            path = raw_path.decode(errors="surrogateescape")
            if status.startswith("D"):
                changes[path] = None
            elif new_mode == SYMLINK_MODE:
                changes[path] = Entry(EntryKind.SYMLINK, 0, new_sha)
            elif not new_mode.startswith("100"):
                changes[path] = Entry(EntryKind.OTHER, 0, new_sha)
            else:
                blobs[path] = new_sha
        sizes = self.repo.object_sizes(list(blobs.values())) if blobs else {}
        for path, sha in blobs.items():
            changes[path] = Entry(EntryKind.FILE, sizes[sha], sha)
        return changes

    def _apply(self, state: _State, commit: str, changes: dict[str, Entry | None]) -> None:
        state.snapshot.commit = commit
        if not changes:
            return
        affected: dict[Name, set[str]] = {}
        for path, entry in changes.items():
            name = _name(path)
            if name not in affected:
                affected[name] = set(state.by_name.get(name, ()))
            if entry is None:
                state.entries.pop(path, None)
                paths = state.by_name.get(name)
                if paths is not None:
                    paths.discard(path)
                    if not paths:
                        del state.by_name[name]
            else:
                state.entries[path] = entry
                state.by_name.setdefault(name, set()).add(path)
        self._reselect(state, affected)
        folders = {folder for folder, _stem_name in affected}
        self._finish(
            state,
            hardware_changed=HARDWARE_DIR in folders,
            templates_changed=TEMPLATES_DIR in folders,
        )

    def _reselect(self, state: _State, previous: dict[Name, set[str]]) -> None:
        """Decide again which file holds each name of ``previous`` (name: the paths that had
        it before the change) and parse what is new."""
        snapshot = state.snapshot
        choices: list[tuple[set[str], set[str], dict[str, str]]] = []
        for name, before in previous.items():
            self._forget(state, name, before)
            paths = state.by_name.get(name, set())
            scratch = Snapshot(commit=snapshot.commit)
            wanted = _select({path: state.entries[path] for path in paths}, scratch)
            for problem in scratch.problems:
                state.skipped[problem.file] = problem
            choices.append((before, paths, wanted))

        # One git process reads every new file, however many names changed.
        missing = [
            sha
            for _before, _paths, wanted in choices
            for path, sha in wanted.items()
            if not (path in state.parsed and state.parsed[path][0] == sha)
        ]
        contents = self.repo.read_blobs(missing) if missing else {}
        for before, paths, wanted in choices:
            for path, sha in wanted.items():
                if path not in state.parsed or state.parsed[path][0] != sha:
                    state.parsed[path] = (sha, *_parse_guarded(path, contents[sha]))
                _sha, record, problems = state.parsed[path]
                if problems:
                    state.troubled.add(path)
                snapshot.blobs[path] = sha
                _add(snapshot, path, record)
            for path in (before | paths) - set(wanted):
                state.parsed.pop(path, None)

    def _forget(self, state: _State, name: Name, before: set[str]) -> None:
        """Remove every trace of the files that held ``name`` before the change."""
        folder, stem = name
        for path in before:
            state.skipped.pop(path, None)
            state.troubled.discard(path)
            state.snapshot.blobs.pop(path, None)
        tables: dict[str, dict[str, Any]] = {
            HARDWARE_DIR: state.snapshot.hardware,
            TEMPLATES_DIR: state.snapshot.templates,
            WORKFLOWS_DIR: state.snapshot.requests,
        }
        table = tables.get(folder, {})
        table.pop(stem, None)

    def _finish(self, state: _State, *, hardware_changed: bool, templates_changed: bool) -> None:
        """Redo the checks across files that a change could affect; gather the problems."""
        snapshot = state.snapshot
        if hardware_changed or templates_changed or not state.cross:
            cross: list[Problem] = []
            snapshot.workers = index_by_worker(snapshot.hardware, cross)
            find_duplicate_ids(snapshot.hardware, cross)
            scratch = Snapshot(commit=snapshot.commit, templates=snapshot.templates)
            _find_duplicate_template_names(scratch)
            state.cross = cross + scratch.problems
        file_problems = [
            problem for path in sorted(state.troubled) for problem in state.parsed[path][2]
        ]
        skipped = [state.skipped[path] for path in sorted(state.skipped)]
        snapshot.problems = [*skipped, *file_problems, *state.cross]
