"""``GET /v1/openapi.json``: the OpenAPI 3.1 document of the API.

Bodies are the pydantic models the routes validate with (and views of what they answer), so
the schemas cannot drift from the code; the list of operations below is checked against the
app's routes by a test, and a schemathesis run holds the server to it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from deployster import __version__, naming, webhooks
from deployster.notify import DeliveryOutcome
from deployster.records import DeployFields, Progress, TaskRecord
from deployster.web.deploys import DeployEnvelope
from deployster.web.inputs import RECORD_ID
from deployster.web.limits import MAX_EVENT_ID
from deployster.web.policies import PolicyEnvelope
from deployster.web.tasks import TaskEnvelope
from handlers.webhooks import Decision

routes = web.RouteTableDef()


class Error(BaseModel):
    error: str  # a short code: invalid_request, not_found, conflict, ...
    description: str  # a sentence that says what to do


class Deploy(DeployFields):
    env: list[str]  # the names only: values are never shown


class DeployAnswer(BaseModel):
    deploy: Deploy


class DeployList(BaseModel):
    deploys: list[Deploy]


class UnitView(BaseModel):
    service: str
    instance: str
    version: str
    current_state: str
    desired_state: str
    machine_id: str
    deploy_timestamp: str


class UnitList(BaseModel):
    units: list[UnitView]
    observed_at: datetime = Field(
        description="When the server's view of fleet was last read in full (UTC); the units "
        "are as fleet listed them then, with Deployster's own changes since applied."
    )
    age: float = Field(description="Seconds since observed_at, when the server answered.")


class Release(BaseModel):
    version: str
    timestamp: str
    deploy_id: str


class LatestDeploy(BaseModel):
    id: str
    version: str
    state: str


class InstanceView(BaseModel):
    unit: str
    url: str
    machine: str  # the fleet machine it announced itself from
    healthy: bool
    routed: bool
    last_probe: str


class ServiceView(BaseModel):
    name: str
    live: Release | None
    latest_deploy: LatestDeploy
    instances: list[InstanceView]


class ServiceList(BaseModel):
    services: list[ServiceView]


class TaskAnswer(BaseModel):
    task: TaskRecord


class TaskList(BaseModel):
    tasks: list[TaskRecord]


class WebhookAnswer(BaseModel):
    decisions: list[Decision]


class NotificationList(BaseModel):
    notifications: list[DeliveryOutcome]  # pending first, then the last 20 that ended


class WebhookLog(BaseModel):
    enabled: list[str]  # the sources with a secret
    events: list[Decision]  # the last 100 decisions, newest first


# Request bodies as the routes validate them; answers as the routes serialize them.
REQUESTS: list[type[BaseModel]] = [DeployEnvelope, PolicyEnvelope, TaskEnvelope]
ANSWERS: list[type[BaseModel]] = [
    Error,
    DeployAnswer,
    DeployList,
    UnitList,
    ServiceList,
    Progress,
    WebhookAnswer,
    WebhookLog,
    TaskAnswer,
    TaskList,
    NotificationList,
]

ERRORS = {
    400: "The request is not valid; the description says which field and why.",
    401: "HTTP basic auth is missing or wrong (a webhook: its secret is).",
    404: "No such service, deploy, version or page file (a webhook: it is off, no secret is set).",
    409: "Another deploy (or exclusive task) of the service holds its lock, or there is nothing "
    "to roll back to.",
    408: "The body did not arrive within the server's body timeout (10 s by default).",
    413: "The body is larger than 1 MiB.",
    415: "The body is not sent as application/json.",
    502: "fleet (or, for tasks, the Docker engine or the image's registry) failed or cannot be reached.",
    503: "etcd cannot be reached (a webhook: or too many bodies are being read; retry).",
}
NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "the service",
    "schema": {"type": "string", "pattern": naming.SERVICE_PATTERN},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _op(
    summary: str,
    ok: dict[int, dict[str, Any]],
    errors: tuple[int, ...],
    *,
    params: tuple[dict[str, Any], ...] = (NAME,),
    body: type[BaseModel] | dict[str, Any] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(status): answer for status, answer in ok.items()}
    for status in (*errors, *(() if public else (401,)), 503):
        responses[str(status)] = _json(Error, ERRORS[status])
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = list(params)
    if isinstance(body, dict):
        op["requestBody"] = {"required": True, "content": body}
    elif body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if public:
        op["security"] = []  # the route checks its own secret
    return op


def _webhook(
    provider: str,
    secret: str,
    content_types: tuple[str, ...],
    params: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    return {
        "post": _op(
            f"A push notification from {provider} (no basic auth: {secret}); 202 with the decision "
            "for each event, also when nothing is deployed",
            {202: _json(WebhookAnswer, "the decisions, each with its reason")},
            (400, 401, 404, 408, 413, 415),
            params=params,
            body={t: {"schema": {"type": "object"}} for t in content_types},
            public=True,
        )
    }


def _path_param(name: str, description: str, pattern: str | None = None) -> dict[str, Any]:
    schema = {"type": "string", **({"pattern": pattern} if pattern else {})}
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def _object(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str, content_type: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {content_type: {"schema": {"type": "string"}}}}


def paths() -> dict[str, dict[str, Any]]:
    deploy_id = _path_param("id", "the deploy's id", RECORD_ID)
    version = _path_param("version", "a version (image tag)", naming.VERSION_PATTERN)
    started = {
        201: _json(DeployAnswer, "fleet accepted the units; the deploy goes on"),
        202: _json(
            DeployAnswer, "queued behind another deploy, or fleet is slow: the deploy goes on"
        ),
    }
    return {
        "/": {
            "get": _op(
                "The status page (HTML; the browser's basic-auth prompt is the login)",
                {200: _text("the page", "text/html")},
                (),
                params=(),
            )
        },
        "/static/{file}": {
            "get": _op(
                "The status page's stylesheet (style.css) and script (app.js)",
                {
                    200: {
                        "description": "the file",
                        "content": {
                            "text/css": {"schema": {"type": "string"}},
                            "text/javascript": {"schema": {"type": "string"}},
                        },
                    }
                },
                (404,),
                params=(_path_param("file", "the file's name"),),
            )
        },
        "/v1/version": {
            "get": _op("Deployster's version", {200: _text("the version")}, (), params=())
        },
        "/healthz": {
            "get": _op(
                "Liveness: the process answers (no credentials)",
                {200: _object("alive", {"status": {"const": "ok"}})},
                (),
                params=(),
                public=True,
            )
        },
        "/readyz": {
            "get": _op(
                "Readiness: etcd and fleet answer (no credentials); 503 names what is down",
                {
                    200: _object(
                        "ready",
                        {
                            "status": {"const": "ready"},
                            "etcd": {"const": "ok"},
                            "fleet": {"const": "ok"},
                        },
                    )
                },
                (),
                params=(),
                public=True,
            )
        },
        "/v1/openapi.json": {
            "get": _op(
                "This document",
                {200: {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
                (),
                params=(),
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics", {200: _text("the text exposition format")}, (), params=()
            )
        },
        "/v1/services": {
            "get": _op(
                "Every service with its live release and instance health",
                {200: _json(ServiceList, "the services")},
                (),
                params=(),
            )
        },
        "/v1/services/{name}/deploys": {
            "post": _op(
                "Deploy a version", started, (400, 408, 409, 413, 415, 502), body=DeployEnvelope
            ),
            "get": _op(
                "The deploy history, newest first", {200: _json(DeployList, "the deploys")}, (400,)
            ),
        },
        "/v1/services/{name}/deploys/{id}": {
            "get": _op(
                "One deploy's record",
                {200: _json(DeployAnswer, "the record")},
                (400, 404),
                params=(NAME, deploy_id),
            ),
        },
        "/v1/services/{name}/deploys/{id}/events": {
            "get": _op(
                "The deploy's progress as Server-Sent Events (data: Progress), from the "
                "first (or after Last-Event-ID), then live, until the deploy ends",
                {200: _text("the events", "text/event-stream")},
                (400, 404),
                params=(
                    NAME,
                    deploy_id,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": f"^[0-9]{{1,{MAX_EVENT_ID}}}$"},
                    },
                ),
            ),
        },
        "/v1/services/{name}/deploys/{version}": {
            "delete": _op(
                "Destroy the units of a version",
                {204: {"description": "destroyed"}},
                (400, 404, 502),
                params=(
                    NAME,
                    version,
                    {
                        "name": "timestamp",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ),
            ),
        },
        "/v1/services/{name}/units": {
            "get": _op(
                "The service's units, from the server's observed view of fleet",
                {200: _json(UnitList, "the units, and how fresh the view is")},
                (400, 502),
            ),
        },
        "/v1/services/{name}/rollback": {
            "post": _op(
                "Deploy the last successful release before the live one again",
                started,
                (400, 409, 502),
            ),
        },
        "/v1/services/{name}/tasks": {
            "post": _op(
                "Run a one-off task from the service's image: the output as it comes, then the "
                "original's trailer `Exited (N) ...` (124: killed at the time limit)",
                {
                    200: {
                        **_text("the output and the trailer"),
                        "headers": {
                            "X-Task-Id": {
                                "schema": {"type": "string"},
                                "description": "the task's id",
                            },
                            "Location": {"schema": {"type": "string"}, "description": "its record"},
                        },
                    }
                },
                (400, 408, 409, 413, 415, 502),
                body=TaskEnvelope,
            ),
            "get": _op(
                "The service's tasks, newest first", {200: _json(TaskList, "the records")}, (400,)
            ),
        },
        "/v1/services/{name}/tasks/{id}": {
            "get": _op(
                "One task's record; with ?follow=1 its output as it comes and the trailer",
                {
                    200: {
                        "description": "the record, or with follow=1 the output",
                        "content": {
                            "application/json": {"schema": _ref(TaskAnswer)},
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    }
                },
                (400, 404, 409),
                params=(
                    NAME,
                    _path_param("id", "the task's id", RECORD_ID),
                    {
                        "name": "follow",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ),
            ),
        },
        "/v1/webhooks/dockerhub/{token}": _webhook(
            "Docker Hub",
            "the token in the path is the secret",
            ("application/json",),
            (_path_param("token", "the Docker Hub webhook secret"),),
        ),
        "/v1/webhooks/registry": _webhook(
            "a Docker registry", "Authorization: Bearer <secret>", webhooks.REGISTRY_CONTENT_TYPES
        ),
        "/v1/webhooks/harbor": _webhook(
            "Harbor", "its auth header holds the secret", webhooks.HARBOR_CONTENT_TYPES
        ),
        "/v1/webhooks/ghcr": _webhook(
            "GitHub (package events)",
            "X-Hub-Signature-256 signs the body",
            webhooks.GITHUB_CONTENT_TYPES,
        ),
        "/v1/webhooks/events": {
            "get": _op(
                "The last 100 webhook decisions, newest first",
                {200: _json(WebhookLog, "the decisions")},
                (404,),
                params=(),
            )
        },
        "/v1/services/{name}/notifications": {
            "get": _op(
                "The service's pending notifications, then the last that ended (receivers by "
                "origin only)",
                {200: _json(NotificationList, "the deliveries, newest first")},
                (400, 404),
            )
        },
        "/v1/services/{name}/policy": {
            "get": _op("The service's policy", {200: _json(PolicyEnvelope, "the policy")}, (400,)),
            "put": _op(
                "Set the service's policy (missing fields take the defaults)",
                {200: _json(PolicyEnvelope, "the policy now in force")},
                (400, 408, 413, 415),
                body=PolicyEnvelope,
            ),
        },
    }


def document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [*((m, "validation") for m in REQUESTS), *((m, "serialization") for m in ANSWERS)],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Deployster",
            "version": __version__,
            "description": "Zero-downtime deploys of Docker images onto a fleet cluster.",
        },
        "security": [{"basic": []}],
        "paths": paths(),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
        },
    }


@routes.get("/v1/openapi.json")
async def openapi(_: web.Request) -> web.Response:
    return web.json_response(document())
