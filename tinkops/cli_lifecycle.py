"""``workflow delete`` and ``workflow rerun``: changing workflows that exist, the GitOps way.

A rendered workflow never changes, and these commands never delete its ref, so its history
stays readable. What they change is the main branch, with one commit:

- ``delete`` on a workflow that is still PENDING or RUNNING sets ``cancel: true`` in its
  request (adding the request back if it was removed). The provisioner then ends the
  workflow CANCELLED, and the agent kills the action it is running. On a workflow that has
  ended, or on a request that was never rendered, ``delete`` removes the request file.
- ``rerun`` commits a new request, ``<id>-rerun-<n>``, for the template, machines and values
  of a rendered workflow. The provisioner renders the template as it is now on main.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from tinkops.cli_common import (
    BranchOption,
    PushOption,
    RepoOption,
    console,
    main_commit,
    open_repo,
    print_commit,
    warn,
)
from tinkops.cli_workflow import (
    WorkflowIdArgument,
    load_head,
    missing_workflow,
    request_files,
    workflow_app,
)
from tinkops.errors import Problem, TinkopsError
from tinkops.gitops import commit_file, commit_files, fetch_state
from tinkops.repository import WORKFLOWS_DIR
from tinkops.request import WorkflowRequest, parse_request, valid_workflow_id
from tinkops.views import NOT_RENDERED
from tinkops.workflows import list_workflow_ids, load_workflow
from tinkops.yamltext import dump, load
from tinkops_agent.eventlog import WorkflowHead
from tinkops_agent.gitrepo import GitRepo
from tinkops_agent.protocol import workflow_ref

# A top-level ``cancel:`` key; nested keys are indented, so they never match.
_CANCEL_KEY = re.compile(r"^cancel:.*$", re.MULTILINE)
_MAX_ID_LENGTH = 63


class DeleteAction(enum.Enum):
    CANCEL = "cancel"
    """The workflow is still active: ``cancel: true`` goes into its request."""
    REMOVE = "remove"
    """The workflow has ended, or was never rendered: its request file goes."""
    NOTHING = "nothing"
    """Already done: the cancel is requested, or the request is gone."""


@dataclass(frozen=True)
class DeletePlan:
    workflow_id: str
    action: DeleteAction
    path: str
    content: bytes | None
    """The request's new content for CANCEL; None for REMOVE and NOTHING."""
    state: str
    """The workflow's state, or ``NOT RENDERED``."""


# --- Requests as text -----------------------------------------------------------------------


def parse_request_text(workflow_id: str, path: str, data: bytes) -> WorkflowRequest | None:
    """Return the request that ``data`` holds, or None when it has any problem."""
    problems: list[Problem] = []
    document = load(path, data, problems)
    if document is None:
        return None
    request = parse_request(workflow_id, document, problems)
    return None if problems else request


def set_cancel(text: str) -> str:
    """Return the request text with its top-level ``cancel`` set to true."""
    if _CANCEL_KEY.search(text):
        return _CANCEL_KEY.sub("cancel: true", text, count=1)
    return text.rstrip("\n") + "\ncancel: true\n"


def cancelled_request(head: WorkflowHead, path: str, candidates: list[bytes | None]) -> bytes:
    """Return request content that makes the provisioner cancel ``head``'s workflow.

    The first candidate text (the request on main, then the one the workflow was rendered
    from) that still reads as a valid request with ``cancel: true`` added is kept, comments
    and all. Otherwise a request is written from the rendered workflow's template and device
    map, which is enough, because a rendered workflow is never rendered again.
    """
    workflow_id = head.workflow.id
    for data in candidates:
        if data is None:
            continue
        candidate = set_cancel(data.decode(errors="replace")).encode()
        request = parse_request_text(workflow_id, path, candidate)
        if request is not None and request.cancel:
            return candidate
    fallback = {
        "template": head.workflow.template,
        "hardware_map": dict(head.workflow.hardware_map),
        "cancel": True,
    }
    return dump(fallback).encode()


def source_request(repo: GitRepo, head: WorkflowHead) -> bytes | None:
    """Return the request file as it was in the commit the workflow was rendered from."""
    workflow = head.workflow
    if not workflow.source_commit or not workflow.request:
        return None
    return repo.read_file(workflow.source_commit, workflow.request)


# --- delete ---------------------------------------------------------------------------------


def plan_delete(
    repo: GitRepo, workflow_id: str, request_path: str | None, head: WorkflowHead | None
) -> DeletePlan:
    """Decide what ``workflow delete`` commits for one workflow."""
    if head is None:
        if request_path is None:
            raise missing_workflow(repo, workflow_id)
        return DeletePlan(workflow_id, DeleteAction.REMOVE, request_path, None, NOT_RENDERED)

    state = head.status.state.value
    if head.status.state.terminal:
        if request_path is None:
            return DeletePlan(workflow_id, DeleteAction.NOTHING, "", None, state)
        return DeletePlan(workflow_id, DeleteAction.REMOVE, request_path, None, state)

    path = request_path or head.workflow.request or f"{WORKFLOWS_DIR}/{workflow_id}.yaml"
    current = repo.read_file(main_commit(repo), request_path) if request_path else None
    content = cancelled_request(head, path, [current, source_request(repo, head)])
    if content == current:
        return DeletePlan(workflow_id, DeleteAction.NOTHING, path, None, state)
    return DeletePlan(workflow_id, DeleteAction.CANCEL, path, content, state)


def _describe(plan: DeletePlan) -> str:
    if plan.action is DeleteAction.CANCEL:
        return (
            f"Cancelling\t{plan.workflow_id}\t{plan.state}: {plan.path} now has cancel: true, "
            "so the provisioner ends the workflow CANCELLED"
        )
    if plan.action is DeleteAction.REMOVE and plan.state == NOT_RENDERED:
        return f"Deleted\t{plan.workflow_id}\t{plan.path} removed before it was rendered"
    if plan.action is DeleteAction.REMOVE:
        return (
            f"Deleted\t{plan.workflow_id}\t{plan.state}: {plan.path} removed; the workflow's "
            f"history stays on {workflow_ref(plan.workflow_id)}"
        )
    if plan.path:
        return (
            f"Cancelling\t{plan.workflow_id}\t{plan.state}: {plan.path} already has cancel: "
            "true; delete it again once it has ended to remove the request"
        )
    return f"Deleted\t{plan.workflow_id}\t{plan.state}: its request was already removed"


def _delete_message(plans: list[DeletePlan]) -> str:
    changed = [plan for plan in plans if plan.action is not DeleteAction.NOTHING]
    if len(changed) == 1:
        plan = changed[0]
        verb = "Cancel workflow" if plan.action is DeleteAction.CANCEL else "Delete workflow"
        subject = f"{verb} {plan.workflow_id}"
    else:
        subject = "Delete workflows " + ", ".join(plan.workflow_id for plan in changed)
    lines = [
        f"{plan.workflow_id} ({plan.state}): "
        + ("set cancel: true in " if plan.action is DeleteAction.CANCEL else "remove ")
        + plan.path
        for plan in changed
    ]
    return f"{subject}\n\n" + "\n".join(lines) + "\n"


@workflow_app.command("delete")
def workflow_delete(
    workflow_ids: Annotated[list[str], typer.Argument(metavar="ID", help="workflow ids")],
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Cancel active workflows; remove the requests of ended ones.

    The rendered workflow and its history are kept: every command that reads a workflow
    by its id still shows it, and 'workflow list --all' lists it.
    """
    repo = open_repo(repo_path)
    requested_ids = list(dict.fromkeys(workflow_ids))
    if push:
        fetch_state(repo, workflow_ids=requested_ids)
    requests = request_files(repo, main_commit(repo))
    rendered = list_workflow_ids(repo)
    plans = [
        plan_delete(
            repo,
            workflow_id,
            requests.get(workflow_id),
            load_workflow(repo, workflow_id) if workflow_id in rendered else None,
        )
        for workflow_id in requested_ids
    ]

    changes = {plan.path: plan.content for plan in plans if plan.action is not DeleteAction.NOTHING}
    for plan in plans:
        typer.echo(_describe(plan))
    if not changes:
        return
    result = commit_files(repo, changes, _delete_message(plans), branch=branch, push=push)
    print_commit(repo, result, ", ".join(changes))
    if branch is None:
        removed = [
            plan
            for plan in plans
            if plan.action is DeleteAction.REMOVE and plan.state == NOT_RENDERED
        ]
        _cancel_if_rendered_meanwhile(repo, removed, push)


def _cancel_if_rendered_meanwhile(repo: GitRepo, plans: list[DeletePlan], push: bool) -> None:
    """Cancel any removed request that the provisioner rendered just before the removal.

    NOTE: a provisioner pass that read main before the removal and publishes its workflow
    after this check still runs that workflow; 'workflow get' shows it, and deleting it
    again cancels it.
    """
    if not plans:
        return
    if push:
        fetch_state(repo, workflow_ids=[plan.workflow_id for plan in plans])
    for plan in plans:
        if repo.rev_parse(workflow_ref(plan.workflow_id)) is None:
            continue
        head = load_workflow(repo, plan.workflow_id)
        if head.status.state.terminal:
            continue
        warn(f"workflow {plan.workflow_id} was rendered before the removal landed; cancelling it")
        content = cancelled_request(head, plan.path, [source_request(repo, head)])
        result = commit_file(
            repo,
            plan.path,
            content,
            f"Cancel workflow {plan.workflow_id}\n\nIt was rendered while its request was "
            "being removed.\n",
            push=push,
        )
        typer.echo(
            _describe(
                DeletePlan(
                    plan.workflow_id,
                    DeleteAction.CANCEL,
                    plan.path,
                    content,
                    head.status.state.value,
                )
            )
        )
        print_commit(repo, result, plan.path)


# --- rerun ----------------------------------------------------------------------------------


_RERUN_SUFFIX = re.compile(r"-rerun-\d+$")


def next_rerun_id(workflow_id: str, existing_ids: Collection[str]) -> str:
    """Return ``<id>-rerun-<n>`` with the lowest ``n`` not in ``existing_ids``.

    A rerun of a rerun counts on from the original id, and the id is shortened to stay a
    valid workflow id (at most 63 characters).
    """
    base = _RERUN_SUFFIX.sub("", workflow_id)
    number = 1
    while True:
        suffix = f"-rerun-{number}"
        candidate = base[: _MAX_ID_LENGTH - len(suffix)].rstrip("-._") + suffix
        if candidate not in existing_ids:
            return candidate
        number += 1


def rerun_request(repo: GitRepo, head: WorkflowHead) -> tuple[dict[str, Any], bool]:
    """Return the request that runs ``head``'s workflow again, and whether its values are known.

    The template and the device map come from the rendered workflow, the values from the
    request it was rendered from.
    """
    request: dict[str, Any] = {
        "template": head.workflow.template,
        "hardware_map": dict(head.workflow.hardware_map),
    }
    source = source_request(repo, head)
    parsed = parse_request_text(head.workflow.id, head.workflow.request, source) if source else None
    if parsed is not None and parsed.values:
        request["values"] = dict(parsed.values)
    return request, parsed is not None


@workflow_app.command("rerun")
def workflow_rerun(
    workflow_id: WorkflowIdArgument,
    new_id: Annotated[
        str | None,
        typer.Option("--id", metavar="ID", help="id of the new workflow (default: ID-rerun-N)"),
    ] = None,
    branch: BranchOption = None,
    push: PushOption = True,
    repo_path: RepoOption = Path("."),
) -> None:
    """Run a workflow again as a new workflow.

    Commits the request ID-rerun-N for the same template, machines and values.
    """
    repo = open_repo(repo_path)
    if push:
        fetch_state(repo)
    head = load_head(repo, workflow_id)
    existing_ids = set(list_workflow_ids(repo)) | set(request_files(repo, main_commit(repo)))
    new_id = new_id or next_rerun_id(workflow_id, existing_ids)
    if not valid_workflow_id(new_id):
        raise TinkopsError(
            f"workflow id {new_id!r} is invalid; use lower-case letters, "
            "digits, '.', '_' and '-' (at most 63 characters)"
        )
    if new_id in existing_ids:
        raise TinkopsError(f"workflow {new_id} already exists; choose another --id")

    request, values_known = rerun_request(repo, head)
    if not values_known:
        warn(
            f"the request {workflow_id} was rendered from is not readable here, so the "
            "rerun has no values; add them to the new request if the template reads any"
        )
    path = f"{WORKFLOWS_DIR}/{new_id}.yaml"
    message = (
        f"Rerun workflow {workflow_id} as {new_id}\n\n"
        f"Request {new_id} renders template {head.workflow.template} again for the "
        f"machines and values of {workflow_id}.\n\n"
        f"Rerun-Of: {workflow_id}\n"
    )
    result = commit_file(repo, path, dump(request).encode(), message, branch=branch, push=push)
    console.print(f"Created Workflow:  {new_id}", markup=False)
    console.print(f"  rerun of {workflow_id} (template {head.workflow.template})", markup=False)
    print_commit(repo, result, path)
