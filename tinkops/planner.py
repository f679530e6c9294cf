"""Turning a workflow request into a rendered workflow: a pure function of one snapshot.

``plan_workflow`` is the one definition of "this request renders": the reconciler, ``tinkops
validate`` and ``tinkops diff`` all call it. Problems found while rendering point at the
template's own file and line, and name the request they were rendered for.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from tinkops.errors import InvalidContent, Problem, RenderError
from tinkops.render import render
from tinkops.repository import Snapshot
from tinkops.request import WorkflowRequest
from tinkops.template import TemplateSource, line_map, parse_rendered
from tinkops.yamltext import load
from tinkops_agent.protocol import Task, Workflow, canonical_worker

log = logging.getLogger(__name__)

_UNDEFINED = re.compile(r"^'([^']+)' is undefined")


def render_context(snapshot: Snapshot, request: WorkflowRequest) -> dict[str, Any]:
    """Return the names a template can use.

    - each device of the map at top level (``{{ device_1 }}``, ``{{.device_1}}``);
    - ``Hardware``: the first device's record with Tinkerbell's Go names (``Disks``,
      ``Interfaces``, ``Metadata``, ``UserData``, ``VendorData``);
    - ``hardware``: each device's record by device name, plus the first device's record as
      Tinkerbell's custom resource (``hardware.spec.metadata.instance.id``);
    - ``values``: the request's values.
    """
    context: dict[str, Any] = dict(request.hardware_map)
    mapped: dict[str, Any] = {}
    for device, worker in request.hardware_map.items():
        record = snapshot.workers.get(canonical_worker(worker))
        if record is not None:
            mapped[device] = record.template_data()
    first = next(iter(request.hardware_map), None)
    first_record = (
        snapshot.workers.get(canonical_worker(request.hardware_map[first])) if first else None
    )
    hardware: dict[str, Any] = first_record.resource() if first_record else {}
    hardware.update(mapped)
    context["Hardware"] = mapped.get(first, {}) if first else {}
    context["hardware"] = hardware
    context["values"] = dict(request.values)
    return context


def plan_workflow(snapshot: Snapshot, request: WorkflowRequest, created_at: str) -> Workflow:
    """Render ``request`` against ``snapshot``; raise InvalidContent listing every problem.

    InvalidContent is the only error raised: a bug met while planning one request is
    logged and reported on that request, so it never stops the others.
    """
    try:
        return _plan(snapshot, request, created_at)
    except InvalidContent:
        raise
    except Exception as error:
        log.exception("planning %s failed", request.file)
        problem = Problem(
            request.file,
            None,
            "",
            f"internal error while rendering ({type(error).__name__}: {error})",
            "report it as a bug; other requests are not affected",
        )
        raise InvalidContent([problem]) from error


def _plan(snapshot: Snapshot, request: WorkflowRequest, created_at: str) -> Workflow:
    template = snapshot.template(request.template)
    if template is None:
        known = ", ".join(sorted(snapshot.templates)) or "none"
        raise InvalidContent(
            [
                Problem(
                    request.file,
                    request.lines.get("template"),
                    "template",
                    f"template {request.template!r} not found",
                    f"use one of: {known}",
                )
            ]
        )
    problems = _unmapped_devices(snapshot, request)
    if problems:
        raise InvalidContent(problems)

    try:
        text = render(template.text, render_context(snapshot, request))
    except RenderError as error:
        raise InvalidContent([_render_problem(template, request, error)]) from error

    found: list[Problem] = []
    document = load(template.file, text.encode(), found)
    parsed = parse_rendered(document, found) if document is not None else None
    rendered_to_text = line_map(template.text, text)

    def to_source(line: int | None) -> int | None:
        return template.file_line(rendered_to_text(line))

    suffix = f" (rendered for {request.file})"
    problems = [
        dataclasses.replace(p, line=to_source(p.line), message=p.message + suffix) for p in found
    ]
    if parsed is None or document is None or problems:
        raise InvalidContent(problems)

    tasks = []
    for index, task in enumerate(parsed.tasks):
        line = to_source(document.line(("tasks", index, "worker")))
        tasks.append(_bind_worker(snapshot, request, template.file, line, task, problems))
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
        tasks=tuple(tasks),
    )


def _unmapped_devices(snapshot: Snapshot, request: WorkflowRequest) -> list[Problem]:
    return [
        Problem(
            request.file,
            request.lines.get(device),
            f"hardware_map.{device}",
            f"no hardware record owns {worker!r}",
            "add the machine under hardware/ or fix the MAC",
        )
        for device, worker in request.hardware_map.items()
        if canonical_worker(worker) not in snapshot.workers
    ]


def _render_problem(
    template: TemplateSource, request: WorkflowRequest, error: RenderError
) -> Problem:
    fix = error.fix or "fix the template or the request"
    undefined = _UNDEFINED.match(error.message)
    if undefined:
        name = undefined.group(1)
        if name.startswith("values."):
            fix = f"add {name[len('values.') :]} under values in {request.file}"
        elif "." not in name and "[" not in name:
            fix = f"map {name} to a machine in the hardware_map of {request.file}"
        else:
            fix = "use a field the hardware record has (see docs/repository-format.md)"
    return Problem(
        template.file,
        template.file_line(error.line),
        "",
        f"{error.message} (rendering for {request.file})",
        fix,
    )


def _bind_worker(
    snapshot: Snapshot,
    request: WorkflowRequest,
    file: str,
    line: int | None,
    task: Task,
    problems: list[Problem],
) -> Task:
    worker = canonical_worker(task.worker)
    if worker not in snapshot.workers:
        problems.append(
            Problem(
                file,
                line,
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
