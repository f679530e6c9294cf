"""The pre-receive hook that enforces the push policy: ``python -m tinkops.prereceive``.

git runs the hook once per push, inside the repository, with one ``<old> <new> <ref>`` line per
ref on stdin. The pushed objects wait in a quarantine directory that git names in the hook's
environment (GIT_OBJECT_DIRECTORY, GIT_QUARANTINE_PATH). So every ``git`` command run here reads
them, and a rejected push leaves nothing behind. The SSH server names the pusher in the
TINKOPS_* variables; a push without them (a local push on the provisioner) is allowed.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

from tinkops.identities import principal_from_environment
from tinkops.pushpolicy import BRANCH_PREFIX, Rejection, check_push, parse_updates
from tinkops_agent.gitrepo import GitError, GitRepo

HOOK_NAME = "pre-receive"
DEFAULT_MAIN_BRANCH = "main"


def run_hook(
    repo: GitRepo, environment: Mapping[str, str], lines: Iterable[str], stderr: TextIO
) -> int:
    """Apply the push policy to ``lines``, print each rejection, and return the exit status."""
    try:
        principal = principal_from_environment(environment)
        updates = parse_updates(lines)
    except ValueError as error:
        print(f"tinkops: rejected push: {error}", file=stderr)
        return 1
    if principal is None:
        return 0

    try:
        rejections = check_push(principal, repo, updates, main_branch=main_branch(repo))
    except GitError as error:
        print(f"tinkops: rejected push: reading the pushed objects failed: {error}", file=stderr)
        return 1
    for rejection in rejections:
        print(f"tinkops: {_one_line(rejection)}", file=stderr)
    return 1 if rejections else 0


def main_branch(repo: GitRepo) -> str:
    """Return the branch HEAD names in the served repository: the main branch."""
    result = repo.execute("symbolic-ref", "--quiet", "HEAD")
    ref = result.stdout.decode().strip()
    if result.returncode != 0 or not ref.startswith(BRANCH_PREFIX):
        return DEFAULT_MAIN_BRANCH
    return ref.removeprefix(BRANCH_PREFIX)


def install_hooks(repository: Path, python: str = sys.executable) -> Path:
    """Write the repository's ``hooks/pre-receive`` so it runs this module with ``python``.

    ``python`` must be an interpreter that can import tinkops. Returns the hook's path.
    """
    hooks = repository / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    script = (
        "#!/bin/sh\n"
        "# Written by tinkops: checks every push against the push policy.\n"
        f"exec {shlex.quote(python)} -m tinkops.prereceive\n"
    )
    path = hooks / HOOK_NAME
    # Write beside the hook and rename, so git never runs a half-written script.
    partial = hooks / f".{HOOK_NAME}.tmp"
    partial.write_text(script)
    partial.chmod(0o755)
    partial.replace(path)
    return path


def _one_line(rejection: Rejection) -> str:
    return " ".join(str(rejection).split())


def main() -> int:
    # git runs the hook with the repository as its working directory and GIT_DIR set.
    repo = GitRepo(Path(os.environ.get("GIT_DIR", ".")).resolve())
    return run_hook(repo, os.environ, sys.stdin, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
