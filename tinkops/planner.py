"""Turning a workflow request into a rendered workflow: a pure function of one snapshot."""

from __future__ import annotations

from typing import Any

from tinkops.errors import InvalidContent, Problem, RenderError
from tinkops.render import render
from tinkops.repository import Snapshot
from tinkops.request import WorkflowRequest
from tinkops.template import parse_rendered
from tinkops.yamltext import load
from tinkops_agent.protocol import Task, Workflow, canonical_worker


def render_context(snapshot: Snapshot, request: WorkflowRequest) -> dict[str, Any]:
    """Return what a template sees: the device map at top level, the mapped hardware records
    (``Hardware`` is the first device's, ``hardware.<device>`` each one's) and ``values``."""
    context: dict[str, Any] = dict(request.hardware_map)
    mapped: dict[str, Any] = {}
    for device, worker in request.hardware_map.items():
        record = snapshot.workers.get(canonical_worker(worker))
        if record is not None:
            mapped[device] = record.template_data()
    first = next(iter(request.hardware_map), None)
    context["Hardware"] = mapped.get(first, {}) if first else {}
    context["hardware"] = mapped
    context["values"] = dict(request.values)
    return context


def plan_workflow(snapshot: Snapshot, request: WorkflowRequest, created_at: str) -> Workflow:
    """Render ``request`` against ``snapshot``; raise InvalidContent listing every problem."""
    problems: list[Problem] = []
    template = snapshot.template(request.template)
    if template is None:
        known = ", ".join(sorted(snapshot.templates)) or "none"
        raise InvalidContent(
            [
                Problem(
                    request.file,
                    None,
                    "template",
                    f"template {request.template!r} not found",
                    f"use one of: {known}",
                )
            ]
        )
    for device, worker in request.hardware_map.items():
        if canonical_worker(worker) not in snapshot.workers:
            problems.append(
                Problem(
                    request.file,
                    None,
                    f"hardware_map.{device}",
                    f"no hardware record owns {worker!r}",
                    "add the machine under hardware/ or fix the MAC",
                )
            )
    if problems:
        raise InvalidContent(problems)

    try:
        text = render(template.text, render_context(snapshot, request))
    except RenderError as error:
        raise InvalidContent(
            [
                Problem(
                    template.file,
                    None,
                    "",
                    f"rendering for {request.file} failed: {error}",
                    "fix the template or the request",
                )
            ]
        ) from error

    rendered_name = f"{template.file} (rendered for {request.file})"
    document = load(rendered_name, text.encode(), problems)
    parsed = parse_rendered(document, problems) if document is not None else None
    if parsed is None or problems:
        raise InvalidContent(problems)

    tasks = tuple(
        _bind_worker(snapshot, request, template.file, task, problems) for task in parsed.tasks
    )
    if problems:
        raise InvalidContent(problems)
    return Workflow(
        id=request.id,
        template=template.name,
        request=request.file,
        source_commit=snapshot.commit,
        created_at=created_at,
        global_timeout=parsed.global_timeout,
        hardware_map=dict(request.hardware_map),
        tasks=tasks,
    )


def _bind_worker(
    snapshot: Snapshot, request: WorkflowRequest, file: str, task: Task, problems: list[Problem]
) -> Task:
    worker = canonical_worker(task.worker)
    if worker not in snapshot.workers:
        problems.append(
            Problem(
                file,
                None,
                f"task {task.name!r}: worker",
                f"{task.worker!r} (rendered for {request.file}) is not the MAC "
                "or agent id of any hardware record",
                "map the device to a MAC listed under hardware/",
            )
        )
    return Task(
        name=task.name,
        worker=worker,
        actions=task.actions,
        volumes=task.volumes,
        environment=task.environment,
    )
