"""Changing the infrastructure repository the GitOps way: every change is a commit.

``commit_file`` adds or replaces one file on a branch of the operator's repository without
touching its work tree or index (a throwaway index builds the tree), then pushes it to
``origin`` when there is one. A push that lost a race is rebuilt on the new tip and retried.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from tinkops.errors import TransportError
from tinkops_agent.gitrepo import GitError, GitRepo, Identity
from tinkops_agent.protocol import STATUS_REF, WORKFLOW_REF_PREFIX

MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class CommitResult:
    commit: str
    branch: str
    pushed: bool


def operator_identity(repo: GitRepo) -> Identity:
    """Return the operator's git identity (user.name / user.email), or a stand-in."""
    name = repo.execute("config", "user.name").stdout.decode().strip()
    email = repo.execute("config", "user.email").stdout.decode().strip()
    return Identity(
        name or os.environ.get("GIT_AUTHOR_NAME") or "tinkops operator",
        email or os.environ.get("GIT_AUTHOR_EMAIL") or "operator@tinkops.invalid",
    )


def is_bare(repo: GitRepo) -> bool:
    return repo.text("rev-parse", "--is-bare-repository").strip() == "true"


def has_origin(repo: GitRepo) -> bool:
    return repo.execute("remote", "get-url", "origin").returncode == 0


def commit_file(
    repo: GitRepo,
    path: str,
    content: bytes | None,
    message: str,
    *,
    base_branch: str = "main",
    branch: str | None = None,
    push: bool = True,
) -> CommitResult:
    """Commit ``content`` at ``path`` (None deletes it) and publish it.

    The commit goes on ``base_branch``, or on a new ``branch`` made from it (for a pull
    request). With an ``origin`` remote and ``push``, it is pushed there; without one, the
    local branch moves (compare-and-swap).
    """
    return commit_files(
        repo, {path: content}, message, base_branch=base_branch, branch=branch, push=push
    )


def commit_files(
    repo: GitRepo,
    changes: Mapping[str, bytes | None],
    message: str,
    *,
    base_branch: str = "main",
    branch: str | None = None,
    push: bool = True,
) -> CommitResult:
    """Commit several files at once (None deletes one), published as ``commit_file`` does."""
    target = branch or base_branch
    remote = push and has_origin(repo)
    identity = operator_identity(repo)
    for _attempt in range(MAX_ATTEMPTS):
        if remote:
            _fetch(repo, base_branch)
            base = repo.rev_parse(f"refs/remotes/origin/{base_branch}")
        else:
            base = repo.rev_parse(f"refs/heads/{base_branch}")
        if base is None:
            raise TransportError(
                f"branch {base_branch!r} not found; is this the infrastructure repository?"
            )
        commit = _commit_on(repo, base, changes, message, identity)
        if remote:
            if _push(repo, commit, target):
                _follow(repo, target, commit)
                return CommitResult(commit, target, True)
            continue
        old = repo.rev_parse(f"refs/heads/{target}")
        if branch is not None and old is not None:
            raise TransportError(f"branch {branch!r} already exists; choose another name")
        if repo.update_ref(f"refs/heads/{target}", commit, old if branch is None else None):
            return CommitResult(commit, target, False)
    raise TransportError(f"{target} kept moving; gave up after {MAX_ATTEMPTS} attempts")


def _commit_on(
    repo: GitRepo,
    base: str,
    changes: Mapping[str, bytes | None],
    message: str,
    identity: Identity,
) -> str:
    with tempfile.TemporaryDirectory(prefix="tinkops-index-") as scratch:
        env = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}
        repo.run("read-tree", base, env=env)
        for path, content in changes.items():
            if content is None:
                # Mode 0 removes the entry; unlike --force-remove it needs no work tree.
                removal = f"0 {'0' * 40}\t{path}\n".encode()
                repo.run("update-index", "--index-info", input=removal, env=env)
            else:
                blob = repo.write_blob(content)
                cacheinfo = f"100644,{blob},{path}"
                repo.run("update-index", "--add", "--cacheinfo", cacheinfo, env=env)
        tree = repo.text("write-tree", env=env).strip()
    return repo.commit_tree(tree, [base], message, identity)


def fetch_branch(repo: GitRepo, branch: str) -> None:
    """Update ``refs/remotes/origin/<branch>`` when the repository has an ``origin``."""
    if has_origin(repo):
        _fetch(repo, branch)


def _fetch(repo: GitRepo, branch: str) -> None:
    try:
        repo.run("fetch", "--quiet", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
    except GitError as error:
        raise TransportError(f"fetching {branch} from origin failed: {error.stderr}") from error


def _push(repo: GitRepo, commit: str, branch: str) -> bool:
    result = repo.execute("push", "--porcelain", "origin", f"{commit}:refs/heads/{branch}")
    if result.returncode == 0:
        return True
    output = (result.stdout + result.stderr).decode(errors="replace")
    if "non-fast-forward" in output or "fetch first" in output:
        return False
    raise TransportError(f"pushing to origin failed: {output.strip()}")


def _follow(repo: GitRepo, branch: str, commit: str) -> None:
    """Bring the local branch up to the pushed commit when that is a fast-forward."""
    repo.execute("update-ref", f"refs/remotes/origin/{branch}", commit)
    local = repo.rev_parse(f"refs/heads/{branch}")
    current = repo.execute("symbolic-ref", "--quiet", "--short", "HEAD").stdout.decode().strip()
    if local is not None and not repo.is_ancestor(local, commit):
        return
    if current == branch and not is_bare(repo):
        repo.execute("merge", "--ff-only", "--quiet", commit)
    else:
        repo.execute("update-ref", f"refs/heads/{branch}", commit)


def fetch_workflow_refs(repo: GitRepo, workflow_ids: list[str] | None = None) -> None:
    """Mirror the provisioner's workflow refs (all, or these) from ``origin``, if there is one."""
    if not has_origin(repo):
        return
    if workflow_ids is None:
        refspecs = [
            "+refs/tinkops/workflows/*:refs/tinkops/workflows/*",
            "+refs/tinkops/status:refs/tinkops/status",
        ]
    else:
        refspecs = [f"+refs/tinkops/workflows/{i}:refs/tinkops/workflows/{i}" for i in workflow_ids]
    result = repo.execute("fetch", "--quiet", "--no-tags", "--prune", "origin", *refspecs)
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        if "couldn't find remote ref" in stderr:
            return
        raise TransportError(f"fetching workflows from origin failed: {stderr}")


def fetch_state(repo: GitRepo, branch: str = "main", workflow_ids: list[str] | None = None) -> None:
    """Fetch main, the reconciler's status and workflow refs (all, or these) in one go.

    Does nothing without an ``origin``. A named workflow or the status ref that origin does
    not have is left out, so one missing ref never keeps the others stale.
    """
    if not has_origin(repo):
        return
    refspecs = [
        f"+refs/heads/{branch}:refs/remotes/origin/{branch}",
        f"+{STATUS_REF}:{STATUS_REF}",
    ]
    if workflow_ids is None:
        refspecs.append(f"+{WORKFLOW_REF_PREFIX}*:{WORKFLOW_REF_PREFIX}*")
    else:
        refspecs += [f"+{WORKFLOW_REF_PREFIX}{i}:{WORKFLOW_REF_PREFIX}{i}" for i in workflow_ids]
    while True:
        result = repo.execute("fetch", "--quiet", "--no-tags", "--prune", "origin", *refspecs)
        if result.returncode == 0:
            return
        stderr = result.stderr.decode(errors="replace").strip()
        missing = _missing_remote_ref(stderr)
        remaining = [spec for spec in refspecs if not spec.startswith(f"+{missing}:")]
        if missing is None or len(remaining) == len(refspecs):
            raise TransportError(f"fetching from origin failed: {stderr}")
        refspecs = remaining


def _missing_remote_ref(stderr: str) -> str | None:
    """Return the ref named by git's "couldn't find remote ref X" message, if that is the error."""
    marker = "couldn't find remote ref "
    for line in stderr.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None
