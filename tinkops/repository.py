"""The infrastructure repository's main branch, read into typed records.

``read_snapshot`` lists the tree of one commit and parses every hardware record, template and
request in it. Parsed files are cached by blob id, so reading a new commit costs one ``ls-tree``
plus the files that changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tinkops.errors import Problem
from tinkops.hardware import Hardware, index_by_worker, parse_hardware
from tinkops.request import WorkflowRequest, parse_request
from tinkops.template import TemplateSource
from tinkops.yamltext import load
from tinkops_agent.gitrepo import SYMLINK_MODE, GitRepo, TreeEntry

log = logging.getLogger(__name__)

HARDWARE_DIR = "hardware"
TEMPLATES_DIR = "templates"
WORKFLOWS_DIR = "workflows"
FOLDERS = (HARDWARE_DIR, TEMPLATES_DIR, WORKFLOWS_DIR)
EXTENSIONS = (".yaml", ".yml")
MAX_FILE_BYTES = 1024 * 1024


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
        for template in self.templates.values():
            if _declared_name(template.text) == name:
                return template
        return None


class SnapshotReader:
    """Reads snapshots of one repository, caching parsed files by blob id."""

    def __init__(self, repo: GitRepo) -> None:
        self.repo = repo
        self._cache: dict[tuple[str, str], tuple[Any, list[Problem]]] = {}

    def read(self, commit: str) -> Snapshot:
        snapshot = Snapshot(commit=commit)
        entries = self.repo.list_entries(commit)
        wanted = self._select(entries, snapshot)
        missing = [sha for path, sha in wanted.items() if (path, sha) not in self._cache]
        contents = self.repo.read_blobs(missing) if missing else {}

        cache: dict[tuple[str, str], tuple[Any, list[Problem]]] = {}
        for path, sha in sorted(wanted.items()):
            key = (path, sha)
            if key not in self._cache:
                self._cache[key] = _parse_file(path, contents[sha])
            cache[key] = self._cache[key]
            record, problems = cache[key]
            snapshot.blobs[path] = sha
            snapshot.problems.extend(problems)
            _add(snapshot, path, record)
        # Keep only the files of the latest commit, so the cache never outgrows one tree.
        self._cache = cache

        snapshot.workers = index_by_worker(snapshot.hardware, snapshot.problems)
        return snapshot

    @staticmethod
    def _select(entries: Mapping[str, TreeEntry], snapshot: Snapshot) -> dict[str, str]:
        wanted: dict[str, str] = {}
        for path, entry in entries.items():
            folder, _, rest = path.partition("/")
            if folder not in FOLDERS or not rest:
                continue
            if "/" in rest:
                snapshot.problems.append(
                    Problem(
                        path,
                        None,
                        "",
                        "files in sub-folders are not read",
                        f"move it directly under {folder}/",
                    )
                )
                continue
            if not rest.endswith(EXTENSIONS):
                if not rest.startswith("."):
                    snapshot.problems.append(
                        Problem(
                            path,
                            None,
                            "",
                            "not a .yaml file, ignored",
                            "rename it to end in .yaml",
                        )
                    )
                continue
            if entry.mode == SYMLINK_MODE or entry.kind != "blob":
                snapshot.problems.append(
                    Problem(
                        path,
                        None,
                        "",
                        "symbolic links and submodules are not read",
                        "store the file itself",
                    )
                )
                continue
            wanted[path] = entry.sha
        return wanted


def _stem(path: str) -> str:
    name = path.rpartition("/")[2]
    for extension in EXTENSIONS:
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def _parse_file(path: str, data: bytes) -> tuple[Any, list[Problem]]:
    problems: list[Problem] = []
    folder = path.partition("/")[0]
    stem = _stem(path)
    if folder == TEMPLATES_DIR:
        # Templates are checked when rendered, because placeholders may not be valid YAML yet.
        if len(data) > MAX_FILE_BYTES:
            problems.append(
                Problem(
                    path,
                    None,
                    "",
                    f"file is {len(data)} bytes, over the limit of {MAX_FILE_BYTES}",
                    "split the template",
                )
            )
            return None, problems
        try:
            return TemplateSource(stem, path, data.decode("utf-8")), problems
        except UnicodeDecodeError:
            problems.append(Problem(path, None, "", "file is not UTF-8 text", "save it as UTF-8"))
            return None, problems
    document = load(path, data, problems)
    if document is None:
        return None, problems
    if document.value is None:
        problems.append(Problem(path, 1, "", "file is empty", "write the record or delete it"))
        return None, problems
    if folder == HARDWARE_DIR:
        return parse_hardware(stem, document, problems), problems
    return parse_request(stem, document, problems), problems


def _add(snapshot: Snapshot, path: str, record: object) -> None:
    if isinstance(record, Hardware):
        snapshot.hardware[record.name] = record
    elif isinstance(record, TemplateSource):
        snapshot.templates[record.name] = record
    elif isinstance(record, WorkflowRequest):
        snapshot.requests[record.id] = record


def _declared_name(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("name:"):
            return line[5:].strip().strip("\"'")
    return None
