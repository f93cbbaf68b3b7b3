"""Task routes: ``POST /v1/services/{name}/tasks`` (the original's streamed answer) and records.

The POST keeps the original's envelope and answer: ``{"task": {"version", "command"}}``, then
200 ``text/plain`` with the output as it comes and the ``Exited (N) ...`` trailer. New fields
in the same envelope: ``command`` as an argv list, ``timeout`` (seconds) and ``env``. A task
that cannot start (bad input, image not pullable, Docker unreachable, an overlapping task)
gets the JSON error envelope before any byte of output. The route asks the task handler
directly instead of publishing an event: a task's output is a byte stream for its caller.
"""

from __future__ import annotations

import re

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployster import logs, naming
from deployster.web.auth import USER
from deployster.web.context import services
from deployster.web.errors import ApiError
from deployster.web.inputs import checked, read_json, record_id, service_name
from deployster.web.limits import bounded_command, bounded_env
from handlers.tasks import TaskRejectedError, TaskRun, TaskRunner, TaskSpec, trailer

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MIN_TASK_TIMEOUT = 1.0  # seconds: a smaller limit cannot even pull and start a container


class TaskBody(BaseModel):
    # Unknown keys are refused: a misspelt "timeout" must not silently become 10 minutes.
    model_config = ConfigDict(extra="forbid")

    version: str
    command: str | list[str]
    timeout: float | None = Field(None, ge=MIN_TASK_TIMEOUT)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _command(cls, value: str | list[str]) -> str | list[str]:
        parts = [value] if isinstance(value, str) else value
        if not parts or not parts[0].strip():
            raise ValueError("the command is empty")
        if any("\0" in part for part in parts):
            raise ValueError("the command contains a NUL character")
        bounded_command(parts)
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(
                    f"environment variable name {key!r} is not valid: use letters, "
                    "digits and '_', not starting with a digit"
                )
            if "\0" in item:
                raise ValueError(
                    f"the value of environment variable {key} contains a NUL character"
                )
        return logs.register_env(bounded_env(value))


class TaskEnvelope(BaseModel):
    task: TaskBody


def _runner(request: web.Request) -> TaskRunner:
    runner = services(request).tasks
    if runner is None:
        raise ApiError(503, "This server does not run tasks (no Docker endpoint is configured).")
    return runner


async def _stream(request: web.Request, run: TaskRun) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/plain", "X-Task-Id": run.record.id, "Location": run.url},
    )
    await response.prepare(request)
    try:
        async for chunk in run.follow():
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        # The client went away; the task goes on (handlers/tasks.py) and can be followed again.
        log.info("task_follower_gone", service=run.record.service, task_id=run.record.id)
    return response


@routes.post("/v1/services/{name}/tasks")
async def run_task(request: web.Request) -> web.StreamResponse:
    service = service_name(request)
    body = (await read_json(request, TaskEnvelope)).task
    checked(naming.validate_version, body.version)
    runner = _runner(request)
    spec = TaskSpec(
        service=service,
        version=body.version,
        command=body.command,
        timeout=body.timeout,
        env=body.env,
        actor=request[USER],
    )
    try:
        run = await runner.submit(spec)
    except TaskRejectedError as exc:
        raise ApiError(exc.status, exc.description) from None
    return await _stream(request, run)


@routes.get("/v1/services/{name}/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    service = service_name(request)
    records = await _runner(request).store.list_tasks(service)
    return web.json_response({"tasks": [r.public() for r in reversed(records)]})


@routes.get("/v1/services/{name}/tasks/{id}")
async def get_task(request: web.Request) -> web.StreamResponse:
    """The record; with ``?follow=1`` the output (from the start of the kept tail) as it
    comes, ending with the trailer, as the POST streams it."""
    service = service_name(request)
    task_id = record_id(request, "task")
    follow = request.query.get("follow", "") not in ("", "0", "false")
    runner = _runner(request)
    run = runner.running(task_id)
    if run is not None and run.record.service == service:
        return (
            await _stream(request, run)
            if follow
            else web.json_response({"task": run.record.public()})
        )
    record = await runner.store.get(service, task_id)
    if record is None:
        raise ApiError(404, f"Service {service!r} has no task {task_id!r}.")
    if not follow:
        return web.json_response({"task": record.public()})
    if not record.state.finished:
        raise ApiError(
            409,
            f"Task {task_id} is {record.state} but this server does not follow it; "
            "ask the server that runs it.",
        )
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "text/plain", "X-Task-Id": task_id}
    )
    await response.prepare(request)
    await response.write(record.output.encode() + trailer(record))
    await response.write_eof()
    return response
