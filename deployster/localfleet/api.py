"""fleet's v1 HTTP API over the registry and the agent (fleet-api.md, `api/*.go`).

Routing is done by hand in `_dispatch` rather than by aiohttp's router,
because fleet's answers for paths and methods come from Go's `ServeMux` and
its handlers, and they are part of the contract:

- resources live under `/fleet/v1/` and, as an alias, `/v1-alpha/`;
- a trailing slash or an extra segment is 404, an unknown path is 404,
  `/` and the bare prefix are 405;
- a wrong method on a resource is 405 with fleet's message, except on
  `/discovery`, where fleet answers 400;
- `{name}` is one segment of the decoded path, so `@` and `:` need no escaping.

One resource is localfleet's own: `GET /fleet/v1/journal/{name}?lines=N` answers
`{"lines": [...]}`, the last N (default 20, at most 100) lines of the unit's
journal, where fleet leaves a failed unit's reason in the machine's journal.
fleet answers 404 there, as localfleet does for a unit loaded on no machine, so
a client reads it when it is offered and falls back to the unit state.

`_put_unit` follows fleet's `unitsResource.set` check by check (fleet-api.md
§4), including its quirks: replacing the options of an existing unit is not
re-validated and resets the desired state to `inactive` unless the request
names one; setting the desired state of an existing unit does not validate it.

Every response carries `Server: fleetd/<version>`; every error is fleet's
`{"error":{"code":N,"message":"..."}}`; an unexpected exception is logged and
answered 500 with an empty message, as fleet does.
"""

from __future__ import annotations

import json
import re
from typing import Any

import structlog
from aiohttp import web

from deployster.fleet import JOB_INACTIVE, JOB_STATES, Unit

from .agent import Agent
from .journal import TAIL_LINES
from .pagination import InvalidPageTokenError, PageToken, page_token_from_query, slice_page
from .registry import Registry, UnitRecord
from .unitfile import InvalidUnitOptionsError, check_serializable, unit_hash
from .unitname import InvalidUnitNameError, parse_unit_name, validate_unit_name
from .wire import (
    InvalidRequestBodyError,
    decode_metadata_ops,
    decode_unit_request,
    error_entity,
    go_json_dumps,
    page_json,
    unit_shape,
    unit_text,
    units_page_json,
)
from .xfleet import InvalidRequirementsError, validate_requirements

log = structlog.get_logger()

VERSION = "localfleet-1.0.0"
SERVER_HEADER = f"fleetd/{VERSION}"
PREFIXES = ("/fleet/v1", "/v1-alpha")
# fleet reads bodies without a limit; unit files are small, this only stops abuse.
MAX_BODY_SIZE = 16 * 1024 * 1024

# Matched with fullmatch: Go's `$` never matches before a trailing newline.
_METADATA_PATH = re.compile(r"/([^/]+)/metadata/([A-Za-z0-9_.-]+)")

REGISTRY_KEY = web.AppKey("registry", Registry)
AGENT_KEY = web.AppKey("agent", Agent)
TOKEN_LIMIT_KEY = web.AppKey("token_limit", int)
# Each listed unit's JSON, by name, with what it was written from (the record, which a change
# replaces, and the states): a page of units is mostly these, written once per change.
UNIT_JSON_KEY = web.AppKey("unit_json", dict[str, tuple[UnitRecord, str | None, str | None, str]])

_DISCOVERY = {
    "kind": "discovery#restDescription",
    "discoveryVersion": "v1",
    "id": "fleet:v1",
    "name": "schema",
    "version": "v1",
    "title": "fleet API",
    "description": "fleet's v1 API, served by localfleet",
    "protocol": "rest",
    "baseUrl": "$ENDPOINT/fleet/v1/",
    "basePath": "/fleet/v1/",
    "rootUrl": "$ENDPOINT/",
    "servicePath": "fleet/v1/",
    "resources": {
        "Machines": {
            "methods": {
                "List": {"id": "fleet.Machine.List", "path": "machines", "httpMethod": "GET"}
            }
        },
        "Units": {
            "methods": {
                "List": {"id": "fleet.Unit.List", "path": "units", "httpMethod": "GET"},
                "Get": {"id": "fleet.Unit.Get", "path": "units/{unitName}", "httpMethod": "GET"},
                "Set": {"id": "fleet.Unit.Set", "path": "units/{unitName}", "httpMethod": "PUT"},
                "Delete": {
                    "id": "fleet.Unit.Delete",
                    "path": "units/{unitName}",
                    "httpMethod": "DELETE",
                },
            }
        },
        "UnitState": {
            "methods": {
                "List": {"id": "fleet.UnitState.List", "path": "state", "httpMethod": "GET"}
            }
        },
    },
}


class ApiError(Exception):
    """An answer with fleet's error entity."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(registry: Registry, agent: Agent, token_limit: int) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_SIZE)
    app[REGISTRY_KEY] = registry
    app[AGENT_KEY] = agent
    app[TOKEN_LIMIT_KEY] = token_limit
    app[UNIT_JSON_KEY] = {}
    app.router.add_route("*", "/{path:.*}", _dispatch)
    app.on_response_prepare.append(_set_server_header)
    return app


async def _set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


def _json_response(status: int, payload: Any) -> web.Response:
    return web.Response(
        status=status, body=go_json_dumps(payload).encode(), content_type="application/json"
    )


def _error_response(status: int, message: str = "") -> web.Response:
    return _json_response(status, error_entity(status, message))


async def _dispatch(request: web.Request) -> web.StreamResponse:
    try:
        return await _route(request)
    except ApiError as exc:
        return _error_response(exc.status, exc.message)
    except web.HTTPException as exc:  # from aiohttp itself, e.g. 413 for a body over MAX_BODY_SIZE
        return _error_response(exc.status, exc.reason)
    except Exception:
        log.exception("api_error", method=request.method, path=request.path)
        return _error_response(500)


async def _route(request: web.Request) -> web.StreamResponse:
    path = request.path
    for prefix in PREFIXES:
        if path == prefix:
            raise ApiError(405)
        if path == f"{prefix}/discovery":
            return _discovery(request)
        if path == f"{prefix}/machines":
            return await _machines(request)
        if path.startswith(f"{prefix}/journal/"):
            return _journal(request, path[len(prefix) + len("/journal/") :])
        for resource, collection, item in (("units", _units, _unit), ("state", _states, _state)):
            base = f"{prefix}/{resource}"
            if path == base:
                return await collection(request)
            if path.startswith(base + "/"):
                name = path[len(base) + 1 :]
                if not name or "/" in name:
                    raise ApiError(404)
                return await item(request, name)
    raise ApiError(405 if path == "/" else 404)


def _discovery(request: web.Request) -> web.Response:
    if request.method != "GET":
        raise ApiError(400, "only HTTP GET supported against this resource")
    return _json_response(200, _DISCOVERY)


def _page_token(request: web.Request) -> PageToken:
    try:
        return page_token_from_query(
            request.query.getall("nextPageToken", []), request.app[TOKEN_LIMIT_KEY]
        )
    except InvalidPageTokenError as exc:
        raise ApiError(400, str(exc)) from exc


# /units


async def _units(request: web.Request) -> web.Response:
    if request.method != "GET":
        raise ApiError(405, "only GET supported against this resource")
    token = _page_token(request)
    registry = request.app[REGISTRY_KEY]
    names, next_token = slice_page(registry.unit_names(), token)
    agent = request.app[AGENT_KEY]
    # fleet's list joins every unit with its schedule entry, global ones included,
    # so a global unit shows currentState "inactive" here but none on GET /units/{name}.
    written = request.app[UNIT_JSON_KEY]
    units = []
    for name in names:
        record = registry.unit(name)
        assert record is not None  # no await since the names were read
        current_state, machine_id = _unit_states(record, agent, listed=True)
        kept = written.get(name)
        if kept is None or kept[:3] != (record, current_state, machine_id):
            shape = unit_shape(
                record.name, record.options, record.desired_state, current_state, machine_id
            )
            kept = written[name] = (record, current_state, machine_id, unit_text(shape))
        units.append(kept[3])
    if len(written) > 2 * len(registry.unit_names()):  # destroyed units' JSON goes, now and then
        for gone in [name for name in written if registry.unit(name) is None]:
            del written[gone]
    text = units_page_json(units, next_token.encode() if next_token else None)
    return web.Response(status=200, body=text.encode(), content_type="application/json")


async def _unit(request: web.Request, name: str) -> web.Response:
    if request.method == "GET":
        return _get_unit(request, name)
    if request.method == "PUT":
        return await _put_unit(request, name)
    if request.method == "DELETE":
        return _delete_unit(request, name)
    raise ApiError(405, "only GET, PUT and DELETE supported against this resource")


def _unit_states(record: UnitRecord, agent: Agent, listed: bool) -> tuple[str | None, str | None]:
    """The unit's currentState and machineID as fleet shows them."""
    if record.is_global:
        return (JOB_INACTIVE if listed else None), None
    job_state = agent.job_state(record.name, record.target) if record.target else None
    return job_state or JOB_INACTIVE, record.target


def _unit_shape(record: UnitRecord, agent: Agent, listed: bool) -> Unit:
    current_state, machine_id = _unit_states(record, agent, listed)
    return unit_shape(record.name, record.options, record.desired_state, current_state, machine_id)


def _get_unit(request: web.Request, name: str) -> web.Response:
    record = request.app[REGISTRY_KEY].unit(name)
    if record is None:
        raise ApiError(404, "unit does not exist")
    return _json_response(200, _unit_shape(record, request.app[AGENT_KEY], listed=False).to_wire())


def _check_content_type(request: web.Request) -> None:
    values = request.headers.getall("Content-Type", [])
    if len(values) != 1:
        raise ApiError(415, f"expected 1 Content-Type, got {len(values)}")
    if values[0].split(";", 1)[0].strip() != "application/json":
        raise ApiError(415, "only acceptable Content-Type is application/json")


async def _put_unit(request: web.Request, item: str) -> web.Response:
    _check_content_type(request)
    try:
        unit = decode_unit_request(await request.read())
    except InvalidRequestBodyError as exc:
        raise ApiError(400, f"unable to decode body: {exc}") from exc
    name = unit.name or item
    if name != item:
        raise ApiError(
            400,
            f"name in URL {json.dumps(item)} differs from unit name in request body {json.dumps(name)}",
        )
    try:
        validate_unit_name(name)
    except InvalidUnitNameError as exc:
        raise ApiError(400, str(exc)) from exc

    registry = request.app[REGISTRY_KEY]
    existing = registry.unit(name)
    if existing is None:
        if not unit.options:
            raise ApiError(409, "unit does not exist and options field empty")
        try:
            check_serializable(unit.options)
            validate_requirements(unit.options)
        except (InvalidUnitOptionsError, InvalidRequirementsError) as exc:
            raise ApiError(400, str(exc)) from exc
        store_options = True
    else:
        store_options = bool(unit.options) and unit_hash(unit.options) != existing.hash

    if store_options:
        desired_state = unit.desired_state or JOB_INACTIVE
        if desired_state not in JOB_STATES:
            log.warning(
                "unit_rejected", unit=name, reason=f"invalid value {desired_state!r} for JobState"
            )
            raise ApiError(500)
        registry.put_unit(name, unit.options, desired_state)
        return web.Response(status=201)

    if not unit.desired_state:
        raise ApiError(409, "must provide DesiredState to update existing unit")
    info = parse_unit_name(name)
    if info is not None and info.is_template and unit.desired_state != JOB_INACTIVE:
        raise ApiError(400, f"cannot activate template {json.dumps(name)}")
    registry.set_desired_state(name, unit.desired_state)
    return web.Response(status=204)


def _delete_unit(request: web.Request, name: str) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    if registry.unit(name) is None:
        raise ApiError(404, "unit does not exist")
    registry.destroy_unit(name)
    return web.Response(status=204)


# /state


async def _states(request: web.Request) -> web.Response:
    if request.method != "GET":
        raise ApiError(405, "only GET supported against this resource")
    token = _page_token(request)
    agent = request.app[AGENT_KEY]
    keys = agent.states(request.query.get("machineID", ""), request.query.get("unitName", ""))
    page, next_token = slice_page(keys, token)
    states = [agent.state(key) for key in page]
    payload = page_json("states", states, next_token.encode() if next_token else None)
    return _json_response(200, payload)


async def _state(request: web.Request, name: str) -> web.Response:
    if request.method != "GET":
        raise ApiError(405, "only GET supported against this resource")
    agent = request.app[AGENT_KEY]
    found = agent.states(unit_name=name)
    if not found:
        raise ApiError(404, "unit state does not exist")
    return _json_response(200, agent.state(found[0]).to_wire())


# /journal (localfleet's own)


def _journal(request: web.Request, name: str) -> web.Response:
    if request.method != "GET":
        raise ApiError(405, "only GET supported against this resource")
    if not name or "/" in name:
        raise ApiError(404)
    raw = request.query.get("lines", "20")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= TAIL_LINES:
        raise ApiError(400, f"lines must be a number from 1 to {TAIL_LINES}")
    lines = request.app[AGENT_KEY].journal_tail(name, int(raw))
    if lines is None:
        raise ApiError(404, "unit is not loaded on any machine")
    return _json_response(200, {"lines": lines})


# /machines


async def _machines(request: web.Request) -> web.Response:
    if request.method == "GET":
        token = _page_token(request)
        machines, next_token = slice_page(request.app[REGISTRY_KEY].machines(), token)
        payload = page_json("machines", machines, next_token.encode() if next_token else None)
        return _json_response(200, payload)
    if request.method == "PATCH":
        return await _patch_machines(request)
    raise ApiError(405, "only GET and PATCH supported against this resource")


async def _patch_machines(request: web.Request) -> web.Response:
    try:
        ops = decode_metadata_ops(await request.read())
    except InvalidRequestBodyError as exc:
        raise ApiError(400, str(exc)) from exc
    for op in ops:
        if op.op not in ("add", "remove", "replace"):
            raise ApiError(400, "invalid op: expect add, remove, or replace")
        if _METADATA_PATH.fullmatch(op.path) is None:
            raise ApiError(400, "machine metadata path invalid")
        if op.op != "remove" and not op.value.value:
            raise ApiError(400, "invalid value: add and replace require a value")
    registry = request.app[REGISTRY_KEY]
    for op in ops:
        match = _METADATA_PATH.fullmatch(op.path)
        assert match is not None
        registry.set_machine_metadata(
            match.group(1), match.group(2), None if op.op == "remove" else op.value.value
        )
    return web.Response(status=204, content_type="application/json")
