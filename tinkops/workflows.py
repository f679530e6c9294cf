"""The rendered workflows of a repository: creating their refs, and reading them back."""

from __future__ import annotations

import subprocess

from tinkops.errors import NotFound
from tinkops.objectwriter import ObjectWriter
from tinkops.yamltext import dump
from tinkops_agent.eventlog import WorkflowHead, read_head
from tinkops_agent.gitrepo import GitError, GitRepo, Identity, TreeEntry
from tinkops_agent.protocol import (
    STATE_FILE,
    WORKFLOW_FILE,
    WORKFLOW_REF_PREFIX,
    Workflow,
    WorkflowStatus,
    queue_ref,
    workers_of,
    workflow_ref,
)

RECONCILER = Identity("tinkops reconciler", "reconciler@tinkops.invalid")


def creation_message(workflow: Workflow) -> str:
    workers = ", ".join(workers_of(workflow))
    return (
        f"Create workflow {workflow.id} from template {workflow.template}\n\n"
        f"Rendered {workflow.request} at {workflow.source_commit[:12]} for {workers}.\n\n"
        f"Tinkops-Workflow: {workflow.id}\n"
        f"Template: {workflow.template}\n"
        f"Source-Commit: {workflow.source_commit}\n"
        f"Workflow-State: PENDING\n"
    )


def write_workflow_commit(
    repo: GitRepo,
    workflow: Workflow,
    identity: Identity = RECONCILER,
    writer: ObjectWriter | None = None,
) -> str:
    """Write the first commit of a workflow ref (definition and PENDING state); move no ref.

    With ``writer`` the objects are written directly (no git process), which is how the
    reconciler renders thousands of workflows a second.
    """
    definition = dump(workflow.to_dict()).encode()
    state = WorkflowStatus.initial(workflow).to_json().encode()
    message = creation_message(workflow)
    if writer is not None:
        tree = writer.files_tree({WORKFLOW_FILE: definition, STATE_FILE: state})
        return writer.commit(tree, [], message, identity)
    root = repo.write_root(
        None,
        {
            WORKFLOW_FILE: TreeEntry("100644", "blob", repo.write_blob(definition)),
            STATE_FILE: TreeEntry("100644", "blob", repo.write_blob(state)),
        },
    )
    return repo.commit_tree(root, [], message, identity)


def _creation_lines(workflow: Workflow, commit: str) -> list[str]:
    lines = [f"create {workflow_ref(workflow.id)} {commit}"]
    lines += [
        f"create {queue_ref(worker, workflow.id)} {commit}" for worker in workers_of(workflow)
    ]
    return lines


def _transaction(repo: GitRepo, lines: list[str]) -> subprocess.CompletedProcess[bytes]:
    payload = "start\n" + "".join(line + "\n" for line in lines) + "commit\n"
    return repo.execute("update-ref", "--stdin", input=payload.encode())


def publish_workflow(repo: GitRepo, workflow: Workflow, commit: str) -> bool:
    """Create the workflow ref and one queue ref per worker in one atomic transaction.

    Returns False when the workflow ref already exists (rendered before, maybe by a run that
    crashed before it could record that).
    """
    result = _transaction(repo, _creation_lines(workflow, commit))
    if result.returncode == 0:
        return True
    if repo.rev_parse(workflow_ref(workflow.id)) is not None:
        return False
    raise GitError(["update-ref", "--stdin"], result.returncode, result.stderr.decode())


def publish_workflows(repo: GitRepo, rendered: list[tuple[Workflow, str]]) -> list[str]:
    """Create the refs of many workflows; return the ids created by this call.

    All go in one transaction (one ``git`` process, all or nothing). When that fails because
    some already exist, each is tried on its own.
    """
    if not rendered:
        return []
    lines = [line for workflow, commit in rendered for line in _creation_lines(workflow, commit)]
    if _transaction(repo, lines).returncode == 0:
        return [workflow.id for workflow, _commit in rendered]
    return [
        workflow.id for workflow, commit in rendered if publish_workflow(repo, workflow, commit)
    ]


def list_workflow_ids(repo: GitRepo) -> dict[str, str]:
    """Return every rendered workflow id with the commit its ref points at."""
    return {
        ref[len(WORKFLOW_REF_PREFIX) :]: sha for ref, sha in repo.refs(WORKFLOW_REF_PREFIX).items()
    }


def load_workflow(repo: GitRepo, workflow_id: str) -> WorkflowHead:
    """Read a workflow by id, from the active refs or else from the archive."""
    commit = repo.rev_parse(workflow_ref(workflow_id)) or repo.rev_parse(
        f"refs/tinkops/archive/{workflow_id}"
    )
    if commit is None:
        raise NotFound(
            f"workflow {workflow_id!r} not found; list them with 'tinkops workflow list'"
        )
    return read_head(repo, commit)
