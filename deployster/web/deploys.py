"""Deploy routes, wire-compatible with the original v1 API.

``POST /v1/services/{name}/deploys`` publishes ``DeployRequested`` and answers once fleet has
accepted the units (201 with the deploy record, as the original answered 201 once the units
were launched), or with the planner's 400, or a 502 naming fleet; a deploy that asked to wait
for the service's lock answers 202 once queued. ``GET .../deploys/{id}/events`` streams the
deploy's progress as Server-Sent Events: every event so far, then each new one, until the
deploy ends (a client that reconnects with ``Last-Event-ID`` gets only what it missed). The
rest read records or the server's observed view of fleet's units, or publish
``DestroyRequested``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from datetime import UTC, datetime

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployster import logs, naming
from deployster.aio import cancel_and_wait
from deployster.events import (
    DeployFailed,
    DeployQueued,
    DeployRejected,
    DeployRequested,
    DestroyRequested,
    Event,
    UnitsDestroyed,
    UnitsSubmitted,
)
from deployster.records import DeploySummary, new_deploy_id
from deployster.releases import live_release, rollback_target
from deployster.units import UnitValueError, validate_env
from deployster.web.auth import USER
from deployster.web.context import CLOSING, services
from deployster.web.errors import ApiError
from deployster.web.inputs import checked, read_json, record_id, service_name, unit_fields
from deployster.web.limits import MAX_EVENT_ID, bounded_env

routes = web.RouteTableDef()

# A sanity bound, not a policy: a typo such as 300 instead of 3 should not reach fleet.
MAX_INSTANCES = 100


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the original accepted service_name etc.

    version: str = Field(json_schema_extra={"pattern": naming.VERSION_PATTERN})
    # JSON's own types only: "3" or "true" is a client bug to report, not to guess at.
    destroy_previous: bool = Field(False, strict=True)
    instance_count: int = Field(0, ge=0, le=MAX_INSTANCES, strict=True)
    timestamp: str = Field("", json_schema_extra={"pattern": f"^$|{naming.TIMESTAMP_PATTERN}"})
    env: dict[str, str] = Field(default_factory=dict)
    # Another deploy of the service is running: queue behind it (202) instead of a 409.
    wait_for_lock: bool = Field(False, strict=True)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return bounded_env(value)  # the unit rule runs in the route, naming the field


class DeployEnvelope(BaseModel):
    deploy: DeployBody


@routes.post("/v1/services/{name}/deploys")
async def create_deploy(request: web.Request) -> web.Response:
    service = service_name(request)
    body = (await read_json(request, DeployEnvelope)).deploy
    checked(naming.validate_version, body.version, field="deploy.version")
    timestamp = (
        checked(naming.validate_timestamp, body.timestamp, field="deploy.timestamp")
        if body.timestamp
        else naming.now_timestamp()
    )
    # Env values are secrets: masked in every log line from here on.
    logs.register_env(body.env)
    # Everything of the request that a unit file will carry, by the units' own rule.
    env = unit_fields(
        {"name": service, "deploy.version": body.version, "deploy.timestamp": timestamp},
        body.env,
    )
    # Every unit name the deploy may need must fit, before the service's lock is taken.
    checked(
        naming.check_length, service, body.version, timestamp, MAX_INSTANCES, field="deploy.version"
    )
    event = DeployRequested(
        service=service,
        deploy_id=new_deploy_id(),
        version=body.version,
        timestamp=timestamp,
        instance_count=body.instance_count,
        destroy_previous=body.destroy_previous,
        env=env,
        actor=request[USER],
        wait_for_lock=body.wait_for_lock,
    )
    return await _start(request, event)


@routes.post("/v1/services/{name}/rollback")
async def rollback(request: web.Request) -> web.Response:
    """Deploy the last successful release before the live one again (a new timestamp, its
    version and environment), replacing the live release; no body is needed."""
    service = service_name(request)
    records = await services(request).store.list_deploys(service)
    target = rollback_target(records)
    if target is None:
        raise ApiError(
            409, f"Service {service!r} has no earlier successful release to roll back to."
        )
    live = live_release(records)
    assert live is not None  # a rollback target implies a live release
    try:  # a record kept from before the units' rule
        validate_env(target.env)
    except UnitValueError as exc:
        raise ApiError(
            409,
            f"The release to roll back to (deploy {target.id}) cannot be deployed again: its {exc}",
        ) from None
    event = DeployRequested(
        service=service,
        deploy_id=new_deploy_id(),
        version=target.version,
        timestamp=naming.now_timestamp(),
        instance_count=live.instance_count,
        destroy_previous=True,
        env=target.env,
        source="rollback",
        actor=request[USER],
    )
    return await _start(request, event)


async def _start(request: web.Request, event: DeployRequested) -> web.Response:
    """Publish the deploy and answer with its outcome: 201 once fleet has the units, 202 once
    queued behind another deploy (or when fleet is slow: the deploy goes on)."""
    ctx = services(request)
    service, deploy_id = event.service, event.deploy_id

    def outcome(e: Event) -> bool:
        outcomes = (UnitsSubmitted, DeployQueued, DeployRejected, DeployFailed)
        return isinstance(e, outcomes) and e.deploy_id == deploy_id

    location = f"/v1/services/{service}/deploys/{deploy_id}"
    try:
        result = await ctx.bus.request(event, until=outcome, timeout=ctx.submit_timeout)
    except TimeoutError:
        # The deploy goes on; its record says how.
        record = await ctx.store.get_deploy(service, deploy_id)
        body_json = {"deploy": record.public() if record else {"id": deploy_id, "state": "pending"}}
        return web.json_response(body_json, status=202, headers={"Location": location})
    if isinstance(result, DeployRejected):
        raise ApiError(result.status, result.description)
    if isinstance(result, DeployFailed):
        raise ApiError(502, f"The deploy failed: {result.reason}.")
    record = await ctx.store.get_deploy(service, deploy_id)
    assert record is not None
    status = 202 if isinstance(result, DeployQueued) else 201
    return web.json_response(
        {"deploy": record.public()}, status=status, headers={"Location": location}
    )


@routes.get("/v1/services")
async def list_services(request: web.Request) -> web.Response:
    """Every service with a deploy record: its live release, its latest deploy, and the health
    of its announced instances as the probes see them now."""
    ctx = services(request)
    by_service: dict[str, list[DeploySummary]] = {}
    for record in await ctx.store.deploy_summaries():
        by_service.setdefault(record.service, []).append(record)
    listed = []
    for name, records in sorted(by_service.items()):
        live = live_release(records)
        latest = records[-1]
        listed.append(
            {
                "name": name,
                "live": {"version": live.version, "timestamp": live.timestamp, "deploy_id": live.id}
                if live
                else None,
                "latest_deploy": {
                    "id": latest.id,
                    "version": latest.version,
                    "state": latest.state,
                },
                "instances": [
                    {
                        "unit": str(i.unit),
                        "url": i.url,
                        "machine": i.machine,
                        "healthy": i.healthy,
                        "routed": i.routed,
                        "last_probe": i.describe_last_probe(),
                    }
                    for i in sorted(ctx.instances.of_service(name), key=lambda i: str(i.unit))
                ],
            }
        )
    return web.json_response({"services": listed})


@routes.get("/v1/services/{name}/deploys")
async def list_deploys(request: web.Request) -> web.Response:
    service = service_name(request)
    records = await services(request).store.list_deploys(service)
    return web.json_response({"deploys": [r.public() for r in reversed(records)]})


@routes.get("/v1/services/{name}/deploys/{id}")
async def get_deploy(request: web.Request) -> web.Response:
    service = service_name(request)
    deploy_id = record_id(request, "deploy")
    record = await services(request).store.get_deploy(service, deploy_id)
    if record is None:
        raise ApiError(404, f"Service {service!r} has no deploy {deploy_id!r}.")
    return web.json_response({"deploy": record.public()})


@routes.get("/v1/services/{name}/deploys/{id}/events")
async def deploy_events(request: web.Request) -> web.StreamResponse:
    """The deploy's progress events as Server-Sent Events (``id`` = the event's ``seq``,
    ``event`` = its kind, ``data`` = the event as JSON); the stream ends after the last one."""
    store = services(request).store
    service = service_name(request)
    deploy_id = record_id(request, "deploy")
    last_seen = request.headers.get("Last-Event-ID", "0").strip() or "0"
    if not re.fullmatch(f"[0-9]{{1,{MAX_EVENT_ID}}}", last_seen):
        raise ApiError(400, "Last-Event-ID must be the number of an event of this stream.")
    if await store.get_deploy(service, deploy_id) is None:
        raise ApiError(404, f"Service {service!r} has no deploy {deploy_id!r}.")
    seen = int(last_seen)

    async def relay(stream: EventSourceResponse) -> None:
        nonlocal seen
        async for record in store.follow_deploy(service, deploy_id):
            for progress in record.events:
                if progress.seq > seen:
                    await stream.send(
                        progress.model_dump_json(), id=str(progress.seq), event=progress.kind
                    )
                    seen = progress.seq

    async with sse_response(request) as stream:
        # The stream ends with the deploy, or when the server shuts down.
        relaying = asyncio.create_task(relay(stream))
        closing = asyncio.create_task(request.app[CLOSING].wait())
        try:
            await asyncio.wait({relaying, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(relaying, closing)
    return stream


@routes.delete("/v1/services/{name}/deploys/{version}")
async def destroy_version(request: web.Request) -> web.Response:
    ctx = services(request)
    service = service_name(request)
    version = checked(naming.validate_version, request.match_info["version"])
    timestamp = request.query.get("timestamp") or None
    if timestamp:
        checked(naming.validate_timestamp, timestamp)
    request_id = secrets.token_hex(8)
    event = DestroyRequested(
        service=service, request_id=request_id, version=version, timestamp=timestamp
    )
    result = await ctx.bus.request(
        event,
        until=lambda e: isinstance(e, UnitsDestroyed) and e.request_id == request_id,
        timeout=ctx.submit_timeout,
    )
    assert isinstance(result, UnitsDestroyed)
    if result.failures:
        failed = "; ".join(f"{unit}: {why}" for unit, why in sorted(result.failures.items()))
        raise ApiError(502, f"fleet could not destroy every unit ({failed}).")
    if not result.units:
        at = f" with timestamp {timestamp}" if timestamp else ""
        raise ApiError(404, f"Service {service!r} has no units of version {version!r}{at}.")
    return web.Response(status=204)


@routes.get("/v1/services/{name}/units")
async def list_units(request: web.Request) -> web.Response:
    """The service's units from the server's observed view of fleet (refreshed by every
    reconcile pass and by each change Deployster makes), not a listing of the whole fleet;
    ``observed_at`` and ``age`` say how fresh it is. While fleet does not answer, the view
    answers as it was; only a server that never read fleet answers 502."""
    ctx = services(request)
    service = service_name(request)
    await ctx.fleet_view.ensure(ctx.fleet)
    observed_at, age = ctx.fleet_view.observed_at, ctx.fleet_view.age()
    assert observed_at is not None and age is not None  # ensure read fleet once
    return web.json_response(
        {
            "units": [
                {
                    "service": service,
                    "instance": str(name.instance),
                    "version": name.version,
                    "current_state": unit.current_state,
                    "desired_state": unit.desired_state,
                    "machine_id": unit.machine_id,
                    "deploy_timestamp": name.timestamp,
                }
                for name, unit in ctx.fleet_view.units_of(service)
            ],
            "observed_at": datetime.fromtimestamp(observed_at, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "age": round(age, 3),
        }
    )
