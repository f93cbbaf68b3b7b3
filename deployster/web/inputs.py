"""Request input: JSON bodies into pydantic models, names from the path; 4xx sentences for bad input."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from deployster import naming
from deployster.safejson import JsonRefusedError, load_json
from deployster.units import UnitValueError, unit_value, validate_env
from deployster.web.errors import ApiError, validation_sentence
from deployster.web.limits import read_body

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
RECORD_ID = "^[0-9A-Za-z._-]{1,64}$"  # any deploy or task id (OpenAPI's pattern too)


async def read_json(request: web.Request, model: type[M]) -> M:
    """The body as ``model``, within every limit of ``deployster/web/limits.py``."""
    if request.content_type != "application/json":
        raise ApiError(415, "Send the request body as JSON with Content-Type: application/json.")
    raw = await read_body(request)
    try:
        data = load_json(raw or b"null")
    except JsonRefusedError as exc:
        raise ApiError(400, str(exc)) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_sentence(exc)) from None


def checked(check: Callable[..., T], *args: Any, field: str = "") -> T:
    """Run a naming check; its sentence becomes a 400 (naming the body's ``field`` if given)."""
    try:
        return check(*args)
    except naming.InvalidNameError as exc:
        where = f"The field '{field}' is not valid: " if field else ""
        raise ApiError(400, f"{where}{exc}") from None


def record_id(request: web.Request, kind: str) -> str:
    """The ``{id}`` of a deploy or task; one no record can have is a 404 without a look-up."""
    value = request.match_info["id"]
    if not re.fullmatch(RECORD_ID, value):
        raise ApiError(404, f"No {kind} has an id like that: ids are letters, digits, '-' and '.'.")
    return value


def service_name(request: web.Request) -> str:
    return checked(naming.validate_service, request.match_info["name"])


def unit_fields(words: Mapping[str, str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Check request fields that go into a unit file (``words`` by field name, and the
    ``env`` of ``deploy.env``) with the units module's one rule, before anything happens;
    a refused value becomes a 400 naming its field. Returns the checked copy of ``env``."""
    try:
        for field, value in words.items():
            unit_value(field, value)
        return validate_env(env or {}, "deploy.env")
    except UnitValueError as exc:
        raise ApiError(400, f"The field '{exc.field}' {exc.problem}.") from None
