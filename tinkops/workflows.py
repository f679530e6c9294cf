"""The rendered workflows of a repository: creating their refs, and reading them back."""

from __future__ import annotations

from tinkops.errors import NotFound
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
    repo: GitRepo, workflow: Workflow, identity: Identity = RECONCILER
) -> str:
    """Write the first commit of a workflow ref (definition and PENDING state); move no ref."""
    definition = repo.write_blob(dump(workflow.to_dict()).encode())
    state = repo.write_blob(WorkflowStatus.initial(workflow).to_json().encode())
    root = repo.write_root(
        None,
        {
            WORKFLOW_FILE: TreeEntry("100644", "blob", definition),
            STATE_FILE: TreeEntry("100644", "blob", state),
        },
    )
    return repo.commit_tree(root, [], creation_message(workflow), identity)


def publish_workflow(repo: GitRepo, workflow: Workflow, commit: str) -> bool:
    """Create the workflow ref and one queue ref per worker in one atomic transaction.

    Returns False when the workflow ref already exists (rendered before, maybe by a run that
    crashed before it could record that).
    """
    lines = [f"create {workflow_ref(workflow.id)} {commit}"]
    lines += [
        f"create {queue_ref(worker, workflow.id)} {commit}" for worker in workers_of(workflow)
    ]
    payload = "start\n" + "".join(line + "\n" for line in lines) + "commit\n"
    result = repo.execute("update-ref", "--stdin", input=payload.encode())
    if result.returncode == 0:
        return True
    if repo.rev_parse(workflow_ref(workflow.id)) is not None:
        return False
    raise GitError(["update-ref", "--stdin"], result.returncode, result.stderr.decode())


def ensure_queue_refs(repo: GitRepo, head: WorkflowHead) -> None:
    """Recreate any queue ref of a non-terminal workflow that is missing."""
    if head.status.state.terminal:
        return
    first = repo.text("rev-list", "--max-parents=0", head.commit).split()[0]
    for worker in workers_of(head.workflow):
        ref = queue_ref(worker, head.workflow.id)
        if repo.rev_parse(ref) is None:
            repo.update_ref(ref, first, None)


def list_workflow_ids(repo: GitRepo) -> dict[str, str]:
    """Return every rendered workflow id with the commit its ref points at."""
    return {
        ref[len(WORKFLOW_REF_PREFIX) :]: sha for ref, sha in repo.refs(WORKFLOW_REF_PREFIX).items()
    }


def load_workflow(repo: GitRepo, workflow_id: str) -> WorkflowHead:
    commit = repo.rev_parse(workflow_ref(workflow_id))
    if commit is None:
        raise NotFound(
            f"workflow {workflow_id!r} not found; list them with 'tinkops workflow list'"
        )
    return read_head(repo, commit)
