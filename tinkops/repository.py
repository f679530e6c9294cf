"""The infrastructure repository's main branch, read into typed records.

A snapshot is read from a source: a commit of a git repository (``CommitSource``) or a folder
on disk such as a work tree (``FolderSource``). Both list the same entries, so both get the
same checks: files in sub-folders, symbolic links, special files, oversized files and names
that are not valid record names are reported and skipped, never followed or read whole.

``SnapshotReader`` caches parsed files by blob id, so reading a new commit costs one
``ls-tree`` plus the files that changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tinkops.errors import Problem
from tinkops.hardware import Hardware, find_duplicate_ids, index_by_worker, parse_hardware
from tinkops.jsontext import load_json
from tinkops.request import WorkflowRequest, parse_request
from tinkops.schema import RECORD_NAME, RECORD_NAME_RULE
from tinkops.template import TemplateSource, read_template
from tinkops.yamltext import MAX_FILE_BYTES, load
from tinkops_agent.gitrepo import SYMLINK_MODE, GitRepo

log = logging.getLogger(__name__)

HARDWARE_DIR = "hardware"
TEMPLATES_DIR = "templates"
WORKFLOWS_DIR = "workflows"
FOLDERS = (HARDWARE_DIR, TEMPLATES_DIR, WORKFLOWS_DIR)
EXTENSIONS = (".yaml", ".yml")
# Tinkerbell's JSON hardware documents may be stored as they are.
JSON_EXTENSION = ".json"
FOLDER_WORKTREE = "working tree"


class EntryKind:
    FILE = "file"
    SYMLINK = "symbolic link"
    OTHER = "special file"


@dataclass(frozen=True)
class Entry:
    """One path of a source: what it is, its size in bytes and its git blob id."""

    kind: str
    size: int
    blob: str


class Source(Protocol):
    """The origin of a snapshot: a commit, or a folder on disk."""

    @property
    def label(self) -> str: ...

    def entries(self) -> dict[str, Entry]: ...

    def read(self, blobs: list[str]) -> dict[str, bytes]: ...


class CommitSource:
    """The tree of one commit of a git repository."""

    def __init__(self, repo: GitRepo, commit: str) -> None:
        self.repo = repo
        self.commit = commit

    @property
    def label(self) -> str:
        return self.commit

    def entries(self) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        args = ("ls-tree", "-r", "-l", "-z", "--full-tree", self.commit, "--", *FOLDERS)
        for record in self.repo.run(*args).split(b"\0"):
            if not record:
                continue
            meta, _, name = record.partition(b"\t")
            mode, kind, sha, size = meta.decode().split()
            path = name.decode(errors="surrogateescape")
            if mode == SYMLINK_MODE:
                entries[path] = Entry(EntryKind.SYMLINK, 0, sha)
            elif kind != "blob":
                entries[path] = Entry(EntryKind.OTHER, 0, sha)
            else:
                entries[path] = Entry(EntryKind.FILE, int(size), sha)
        return entries

    def read(self, blobs: list[str]) -> dict[str, bytes]:
        return self.repo.read_blobs(blobs) if blobs else {}


class FolderSource:
    """The files of a folder on disk, as they are now (a work tree, or a plain folder).

    Nothing is followed: a symbolic link, whether to a file or a folder, is reported as one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._contents: dict[str, bytes] = {}

    @property
    def label(self) -> str:
        return FOLDER_WORKTREE

    def entries(self) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        for folder in FOLDERS:
            self._scan(folder, entries)
        return entries

    def _scan(self, relative: str, entries: dict[str, Entry]) -> None:
        try:
            info = os.lstat(self.root / relative)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            entries[relative] = Entry(EntryKind.SYMLINK, 0, "")
            return
        if not stat.S_ISDIR(info.st_mode):
            entries[relative] = Entry(EntryKind.OTHER, 0, "")
            return
        with os.scandir(self.root / relative) as listing:
            children = sorted(listing, key=lambda child: child.name)
        for child in children:
            path = f"{relative}/{child.name}"
            if child.is_dir(follow_symlinks=False):
                # A sub-folder is reported as one entry; nothing inside it is read.
                entries[path + "/"] = Entry(EntryKind.FILE, 0, "")
            elif child.is_symlink():
                entries[path] = Entry(EntryKind.SYMLINK, 0, "")
            elif child.is_file(follow_symlinks=False):
                entries[path] = self._file_entry(path)
            else:
                entries[path] = Entry(EntryKind.OTHER, 0, "")

    def _file_entry(self, path: str) -> Entry:
        # O_NOFOLLOW and O_NONBLOCK: a file swapped for a link or a pipe since it was listed
        # is neither followed nor waited on.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            descriptor = os.open(self.root / path, flags)
        except OSError:
            return Entry(EntryKind.OTHER, 0, "")
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return Entry(EntryKind.OTHER, 0, "")
            if info.st_size > MAX_FILE_BYTES:
                return Entry(EntryKind.FILE, info.st_size, "")
            data = handle.read(MAX_FILE_BYTES + 1)
        blob = blob_id(data)
        self._contents[blob] = data
        return Entry(EntryKind.FILE, len(data), blob)

    def read(self, blobs: list[str]) -> dict[str, bytes]:
        return {blob: self._contents[blob] for blob in blobs}


def blob_id(data: bytes) -> str:
    """Return the id git gives ``data`` as a blob, so folder files compare with commits."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Snapshot:
    """Every record of one commit of the main branch, and every problem found reading it."""

    commit: str
    hardware: dict[str, Hardware] = field(default_factory=dict)
    templates: dict[str, TemplateSource] = field(default_factory=dict)
    requests: dict[str, WorkflowRequest] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    workers: dict[str, Hardware] = field(default_factory=dict)
    blobs: dict[str, str] = field(default_factory=dict)
    """Path to blob id of every file read, for change detection."""

    def problems_of(self, file: str) -> list[Problem]:
        return [problem for problem in self.problems if problem.file == file]

    def template(self, name: str) -> TemplateSource | None:
        """Return the template stored as ``templates/<name>.yaml``, or named ``name`` inside."""
        if name in self.templates:
            return self.templates[name]
        for template in sorted(self.templates.values(), key=lambda t: t.file):
            if template.declared_name == name:
                return template
        return None


class SnapshotReader:
    """Reads snapshots of one repository, caching parsed files by blob id."""

    def __init__(self, repo: GitRepo | None = None) -> None:
        self.repo = repo
        self._cache: dict[tuple[str, str], tuple[Any, list[Problem]]] = {}

    def read(self, commit: str) -> Snapshot:
        """Read the commit ``commit`` of this reader's repository."""
        if self.repo is None:
            raise ValueError("this reader has no repository; use read_source")
        return self.read_source(CommitSource(self.repo, commit))

    def read_source(self, source: Source) -> Snapshot:
        snapshot = Snapshot(commit=source.label)
        wanted = _select(source.entries(), snapshot)
        missing = [sha for path, sha in wanted.items() if (path, sha) not in self._cache]
        contents = source.read(list(dict.fromkeys(missing)))

        cache: dict[tuple[str, str], tuple[Any, list[Problem]]] = {}
        for path, sha in sorted(wanted.items()):
            key = (path, sha)
            if key not in self._cache:
                self._cache[key] = _parse_guarded(path, contents[sha])
            cache[key] = self._cache[key]
            record, problems = cache[key]
            snapshot.blobs[path] = sha
            snapshot.problems.extend(problems)
            _add(snapshot, path, record)
        # Keep only the files of the latest read, so the cache never outgrows one tree.
        self._cache = cache

        snapshot.workers = index_by_worker(snapshot.hardware, snapshot.problems)
        find_duplicate_ids(snapshot.hardware, snapshot.problems)
        _find_duplicate_template_names(snapshot)
        return snapshot


def read_folder(root: Path) -> Snapshot:
    """Read the repository files in the folder ``root`` as they are on disk."""
    return SnapshotReader().read_source(FolderSource(root))


def _select(entries: Mapping[str, Entry], snapshot: Snapshot) -> dict[str, str]:
    """Return the path and blob id of every entry to parse; report the others."""
    wanted: dict[str, str] = {}
    names: dict[tuple[str, str], str] = {}
    for path, entry in sorted(entries.items()):
        reason = _skip_reason(path, entry)
        if reason is None:
            key = (path.partition("/")[0], _stem(path))
            if key in names:
                reason = (
                    f"{names[key]} has the same name",
                    "keep one file per name (.yaml, .yml or .json)",
                )
            else:
                names[key] = path
                wanted[path] = entry.blob
        if reason is not None and reason != _SILENT:
            snapshot.problems.append(Problem(path, None, "", *reason))
    return wanted


# Entries skipped without a problem: hidden files such as .gitkeep.
_SILENT = ("", "")


def _skip_reason(path: str, entry: Entry) -> tuple[str, str] | None:
    """Return (message, fix) for an entry that is not parsed, or None for one that is."""
    folder, _, rest = path.partition("/")
    if not rest:
        kind = "a symbolic link" if entry.kind == EntryKind.SYMLINK else "not a folder"
        return (f"{folder} is {kind}", f"make {folder}/ a plain folder in the repository")
    if "/" in rest:
        return ("files in sub-folders are not read", f"move it directly under {folder}/")
    if rest.startswith("."):
        return _SILENT
    extensions = (*EXTENSIONS, JSON_EXTENSION) if folder == HARDWARE_DIR else EXTENSIONS
    if not rest.endswith(extensions):
        return ("not a .yaml file, ignored", "rename it to end in .yaml")
    if entry.kind == EntryKind.SYMLINK:
        return ("symbolic links are not read", "store the file itself")
    if entry.kind != EntryKind.FILE:
        return ("not a regular file (a submodule or a special file)", "store a plain file")
    if entry.size > MAX_FILE_BYTES or not entry.blob:
        return (
            f"file is {entry.size} bytes, over the limit of {MAX_FILE_BYTES}",
            "split it or remove unused content",
        )
    if not RECORD_NAME.match(_stem(path)):
        return (
            f"file name {_stem(path)!r} is not a valid name",
            RECORD_NAME_RULE,
        )
    return None


def _stem(path: str) -> str:
    name = path.rpartition("/")[2]
    for extension in (*EXTENSIONS, JSON_EXTENSION):
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def _parse_guarded(path: str, data: bytes) -> tuple[Any, list[Problem]]:
    """Parse one file; a bug met while parsing it is reported on that file alone."""
    try:
        return _parse_file(path, data)
    except Exception as error:
        log.exception("reading %s failed", path)
        problem = Problem(
            path,
            None,
            "",
            f"internal error while reading this file ({type(error).__name__}: {error})",
            "report it as a bug; the other files are still read",
        )
        return None, [problem]


def _parse_file(path: str, data: bytes) -> tuple[Any, list[Problem]]:
    problems: list[Problem] = []
    folder = path.partition("/")[0]
    stem = _stem(path)
    if folder == TEMPLATES_DIR:
        text = _template_text(path, data, problems)
        if text is None:
            return None, problems
        return read_template(stem, path, text, problems), problems
    if path.endswith(JSON_EXTENSION):
        document = load_json(path, data, problems)
    else:
        document = load(path, data, problems)
    if document is None:
        return None, problems
    if document.value is None:
        problems.append(Problem(path, 1, "", "file is empty", "write the record or delete it"))
        return None, problems
    if folder == HARDWARE_DIR:
        return parse_hardware(stem, document, problems), problems
    return parse_request(stem, document, problems), problems


def _template_text(path: str, data: bytes, problems: list[Problem]) -> str | None:
    """Return a template's text; templates are YAML only once rendered, so not parsed here."""
    if b"\0" in data:
        problems.append(
            Problem(path, None, "", "file is binary (contains NUL bytes)", "store YAML text")
        )
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        problems.append(
            Problem(
                path,
                None,
                "",
                f"file is not UTF-8 text ({error.reason} at byte {error.start})",
                "save it as UTF-8",
            )
        )
        return None


def _add(snapshot: Snapshot, path: str, record: object) -> None:
    if isinstance(record, Hardware):
        snapshot.hardware[record.name] = record
    elif isinstance(record, TemplateSource):
        snapshot.templates[record.name] = record
    elif isinstance(record, WorkflowRequest):
        snapshot.requests[record.id] = record


def _find_duplicate_template_names(snapshot: Snapshot) -> None:
    owners: dict[str, TemplateSource] = {}
    for template in sorted(snapshot.templates.values(), key=lambda t: t.file):
        declared = template.declared_name
        if not declared:
            continue
        owner = owners.setdefault(declared, template)
        if owner is not template:
            snapshot.problems.append(
                Problem(
                    template.file,
                    template.file_line(_name_line(template.text)),
                    "name",
                    f"template name {declared!r} is already used by {owner.file}",
                    "give every template its own name",
                )
            )


def _name_line(text: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("name:"):
            return number
    return None
