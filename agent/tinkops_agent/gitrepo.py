"""The seam to git: a repository driven through the stock ``git`` command.

Everything here writes objects and moves refs directly (no index, no work tree), so a commit
costs the same whatever the size of the repository. Each call is one short-lived ``git``
process with an explicit argument list; no shell is involved.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ZERO_SHA = "0" * 40


class GitError(RuntimeError):
    """A git command failed; ``stderr`` contains what git printed."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        self.args_ = list(args)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"git {' '.join(args)} failed (exit {returncode}): {self.stderr}")


@dataclass(frozen=True)
class Identity:
    """The author and committer written into commits."""

    name: str
    email: str

    def env(self, when: str | None = None) -> dict[str, str]:
        env = {
            "GIT_AUTHOR_NAME": self.name,
            "GIT_AUTHOR_EMAIL": self.email,
            "GIT_COMMITTER_NAME": self.name,
            "GIT_COMMITTER_EMAIL": self.email,
        }
        if when:
            env["GIT_AUTHOR_DATE"] = when
            env["GIT_COMMITTER_DATE"] = when
        return env


SYMLINK_MODE = "120000"


@dataclass(frozen=True)
class TreeEntry:
    mode: str
    kind: str
    sha: str


@dataclass(frozen=True)
class LogEntry:
    commit: str
    parents: tuple[str, ...]
    author_time: int
    message: str


def signing_environment(key: Path) -> dict[str, str]:
    """Return the variables that make ``git commit-tree -S`` sign with the SSH key ``key``.

    git runs ``ssh-keygen -Y sign -n git -f <key>`` (git 2.34 or later, OpenSSH 8.2 or later).
    ``key`` is a private key file without a passphrase.
    """
    return {
        "GIT_CONFIG_COUNT": "2",
        "GIT_CONFIG_KEY_0": "gpg.format",
        "GIT_CONFIG_VALUE_0": "ssh",
        "GIT_CONFIG_KEY_1": "user.signingKey",
        "GIT_CONFIG_VALUE_1": str(key),
    }


class GitRepo:
    """A git repository (bare or not) at ``path``.

    With ``signing_key``, every commit that ``commit_tree`` writes carries an SSH signature
    made with that private key.
    """

    def __init__(
        self,
        path: Path | str,
        env: Mapping[str, str] | None = None,
        *,
        signing_key: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self._env = dict(env) if env is not None else None
        self.signing_key = signing_key

    def execute(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``git args`` in this repository and return the finished process, unchecked."""
        full_env = dict(self._env if self._env is not None else os.environ)
        full_env.setdefault("GIT_TERMINAL_PROMPT", "0")
        # Lost races are recognised by git's messages, so they must be in English.
        full_env["LC_ALL"] = "C"
        if env:
            full_env.update(env)
        argv = ["git", "-C", str(self.path), *args]
        return subprocess.run(argv, input=input, capture_output=True, env=full_env, check=False)

    def run(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> bytes:
        """Run ``git args`` and return its output; raise GitError when it fails."""
        result = self.execute(*args, input=input, env=env)
        if result.returncode != 0:
            raise GitError(args, result.returncode, result.stderr.decode(errors="replace"))
        return result.stdout

    def text(
        self, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        return self.run(*args, input=input, env=env).decode()

    # --- reading ----------------------------------------------------------------------------

    def rev_parse(self, rev: str) -> str | None:
        result = self.execute("rev-parse", "--verify", "--quiet", rev + "^{commit}")
        sha = result.stdout.decode().strip()
        return sha if result.returncode == 0 and sha else None

    def refs(self, prefix: str) -> dict[str, str]:
        """Return every ref under ``prefix`` with the commit it points at."""
        out = self.text("for-each-ref", "--format=%(objectname) %(refname)", prefix)
        refs: dict[str, str] = {}
        for line in out.splitlines():
            sha, _, name = line.partition(" ")
            refs[name] = sha
        return refs

    def read_file(self, rev: str, path: str) -> bytes | None:
        """Return the content of ``path`` at ``rev``, or None when it does not exist."""
        result = self.execute("cat-file", "blob", f"{rev}:{path}")
        return result.stdout if result.returncode == 0 else None

    def list_files(self, rev: str, path: str = "") -> dict[str, str]:
        """Return ``{path: blob sha}`` of every regular file under ``path`` at ``rev``."""
        return {
            name: entry.sha
            for name, entry in self.list_entries(rev, path).items()
            if entry.kind == "blob" and entry.mode != SYMLINK_MODE
        }

    def list_entries(self, rev: str, path: str = "") -> dict[str, TreeEntry]:
        """Return every blob, symlink and submodule under ``path`` at ``rev``, by path."""
        args = ["ls-tree", "-r", "-z", "--full-tree", rev]
        if path:
            args += ["--", path]
        entries: dict[str, TreeEntry] = {}
        for record in self.run(*args).split(b"\0"):
            if not record:
                continue
            meta, _, name = record.partition(b"\t")
            mode, kind, sha = meta.decode().split()
            entries[name.decode(errors="surrogateescape")] = TreeEntry(mode, kind, sha)
        return entries

    def read_objects(self, names: Sequence[str]) -> dict[str, bytes | None]:
        """Return the content of many objects by name (``<rev>:<path>``, refs, ids), None for
        a missing one, read by one ``git cat-file --batch``."""
        if not names:
            return {}
        unique = list(dict.fromkeys(names))
        if any("\n" in name for name in unique):
            raise ValueError("object names cannot contain newlines")
        out = self.run("cat-file", "--batch", input="".join(n + "\n" for n in unique).encode())
        contents: dict[str, bytes | None] = {}
        position = 0
        for name in unique:
            header_end = out.index(b"\n", position)
            header = out[position:header_end].decode(errors="replace").split()
            if len(header) < 3 or header[-1] == "missing":
                contents[name] = None
                position = header_end + 1
                continue
            size = int(header[2])
            contents[name] = out[header_end + 1 : header_end + 1 + size]
            position = header_end + 1 + size + 1
        return contents

    def resolve(self, names: Sequence[str]) -> dict[str, str | None]:
        """Return the object id each name (ref, ``<rev>:<path>``) points at, None if missing."""
        if not names:
            return {}
        unique = list(dict.fromkeys(names))
        out = self.text(
            "cat-file", "--batch-check", input="".join(n + "\n" for n in unique).encode()
        )
        resolved: dict[str, str | None] = {}
        for name, line in zip(unique, out.splitlines(), strict=True):
            fields = line.split()
            resolved[name] = fields[0] if len(fields) == 3 else None
        return resolved

    def object_sizes(self, shas: Sequence[str]) -> dict[str, int]:
        """Return the size of each object, read by one ``git cat-file --batch-check``."""
        unique = list(dict.fromkeys(shas))
        if not unique:
            return {}
        out = self.text(
            "cat-file",
            "--batch-check=%(objectname) %(objectsize)",
            input="".join(s + "\n" for s in unique).encode(),
        )
        sizes: dict[str, int] = {}
        for sha, line in zip(unique, out.splitlines(), strict=True):
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise GitError(["cat-file", "--batch-check"], 1, f"object {sha} is missing")
            sizes[sha] = int(fields[1])
        return sizes

    def read_blobs(self, shas: Sequence[str]) -> dict[str, bytes]:
        """Return the content of many blobs, read by one ``git cat-file --batch``."""
        if not shas:
            return {}
        unique = list(dict.fromkeys(shas))
        out = self.run("cat-file", "--batch", input="".join(s + "\n" for s in unique).encode())
        blobs: dict[str, bytes] = {}
        position = 0
        for sha in unique:
            header_end = out.index(b"\n", position)
            header = out[position:header_end].decode().split()
            if len(header) < 3 or header[1] == "missing":
                raise GitError(["cat-file", "--batch"], 1, f"object {sha} is missing")
            size = int(header[2])
            blobs[sha] = out[header_end + 1 : header_end + 1 + size]
            position = header_end + 1 + size + 1
        return blobs

    def changed_files(self, old: str, new: str) -> list[tuple[str, str]]:
        """Return ``(status letter, path)`` for every file that differs between two commits."""
        out = self.run("diff-tree", "-r", "-z", "--no-renames", "--name-status", old, new)
        fields = [f.decode() for f in out.split(b"\0") if f]
        return [(fields[i], fields[i + 1]) for i in range(0, len(fields) - 1, 2)]

    def log(self, rev: str, *, reverse: bool = True, limit: int | None = None) -> list[LogEntry]:
        """Return the commits reachable from ``rev``, oldest first unless ``reverse`` is False.

        Records are NUL-separated (``-z``), which a commit message cannot contain, and bytes
        that are not UTF-8 are replaced, so no message can break the parse.
        """
        args = ["log", "-z", "--format=%H%n%P%n%at%n%B"]
        if reverse:
            args.append("--reverse")
        if limit is not None:
            args.append(f"-{limit}")
        args.append(rev)
        entries = []
        for record in self.run(*args).split(b"\0"):
            if not record.strip():
                continue
            commit, parents, when, message = record.decode(errors="replace").split("\n", 3)
            entries.append(
                LogEntry(commit, tuple(parents.split()), int(when), message.strip("\n") + "\n")
            )
        return entries

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return self.execute("merge-base", "--is-ancestor", ancestor, descendant).returncode == 0

    # --- writing ----------------------------------------------------------------------------

    def write_blob(self, data: bytes) -> str:
        return self.text("hash-object", "-w", "--stdin", input=data).strip()

    def write_tree(self, files: Mapping[str, bytes | str]) -> str:
        """Write a tree holding ``files`` (path to content, or to an existing blob sha)."""
        return self._write_subtree(_nest(files))

    def _write_subtree(self, node: Mapping[str, object]) -> str:
        lines = []
        for name in sorted(node):
            child = node[name]
            if isinstance(child, dict):
                lines.append(f"040000 tree {self._write_subtree(child)}\t{name}")
            elif isinstance(child, str):
                lines.append(f"100644 blob {child}\t{name}")
            else:
                assert isinstance(child, bytes)
                lines.append(f"100644 blob {self.write_blob(child)}\t{name}")
        payload = "".join(line + "\n" for line in lines).encode()
        return self.text("mktree", input=payload).strip()

    def write_root(self, base: str | None, replacements: Mapping[str, TreeEntry | None]) -> str:
        """Write the root tree of ``base`` with top-level entries replaced (None removes one)."""
        entries: dict[str, TreeEntry] = {}
        if base is not None:
            for record in self.run("ls-tree", "-z", base).split(b"\0"):
                if record:
                    meta, _, raw_name = record.partition(b"\t")
                    mode, kind, sha = meta.decode().split()
                    entries[raw_name.decode(errors="surrogateescape")] = TreeEntry(mode, kind, sha)
        for name, entry in replacements.items():
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        payload = "".join(
            f"{entry.mode} {entry.kind} {entry.sha}\t{name}\n"
            for name, entry in sorted(entries.items())
        )
        return self.text("mktree", input=payload.encode()).strip()

    def commit_tree(
        self,
        tree: str,
        parents: Sequence[str],
        message: str,
        identity: Identity,
        *,
        signing_key: Path | None = None,
    ) -> str:
        """Write a commit and return its id; it is signed with ``signing_key``, else with the
        repository's own signing key, when either is set."""
        args = ["commit-tree", tree]
        for parent in parents:
            args += ["-p", parent]
        env = identity.env()
        key = signing_key or self.signing_key
        if key is not None:
            args.append("-S")
            env.update(signing_environment(key))
        return self.text(*args, input=message.encode(), env=env).strip()

    def update_ref(self, ref: str, new: str, old: str | None, reason: str = "tinkops") -> bool:
        """Move ``ref`` to ``new`` only if it still points at ``old`` (None: must not exist).

        Returns False when another writer moved the ref first.
        """
        expected = old if old is not None else ZERO_SHA
        try:
            self.run("update-ref", "-m", reason, ref, new, expected)
        except GitError as error:
            if "cannot lock ref" in error.stderr or "but expected" in error.stderr:
                return False
            if "reference already exists" in error.stderr:
                return False
            raise
        return True

    def delete_ref(self, ref: str, old: str | None = None) -> None:
        args = ["update-ref", "-d", ref]
        if old:
            args.append(old)
        self.run(*args)


def _nest(files: Mapping[str, bytes | str]) -> dict[str, object]:
    root: dict[str, object] = {}
    for path, content in files.items():
        parts = [part for part in path.split("/") if part]
        if not parts or any(part in (".", "..") for part in parts):
            raise ValueError(f"invalid path in tree: {path!r}")
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{path!r} needs {part!r} to be a folder, but it is a file")
            node = child
        node[parts[-1]] = content
    return root


def init_bare(path: Path, branch: str) -> GitRepo:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["git", "init", "--quiet", "--bare", f"--initial-branch={branch}", str(path)],
        check=True,
        capture_output=True,
    )
    return GitRepo(path)
