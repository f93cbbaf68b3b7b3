"""Request input: JSON bodies into pydantic models, names from the path; 4xx sentences for bad input."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from deployster import naming
from deployster.web.errors import ApiError, validation_sentence
from deployster.web.limits import JsonRefused, load_json, read_body

M = TypeVar("M", bound=BaseModel)
RECORD_ID = "^[0-9A-Za-z._-]{1,64}$"  # any deploy or task id (OpenAPI's pattern too)


async def read_json(request: web.Request, model: type[M]) -> M:
    """The body as ``model``, within every limit of ``deployster/web/limits.py``."""
    if request.content_type != "application/json":
        raise ApiError(415, "Send the request body as JSON with Content-Type: application/json.")
    raw = await read_body(request)
    try:
        data = load_json(raw or b"null")
    except JsonRefused as exc:
        raise ApiError(400, str(exc)) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_sentence(exc)) from None


def checked(check: Callable[[str], str], value: str) -> str:
    """Run a naming check; its sentence becomes a 400."""
    try:
        return check(value)
    except naming.InvalidName as exc:
        raise ApiError(400, str(exc)) from None


def record_id(request: web.Request, kind: str) -> str:
    """The ``{id}`` of a deploy or task; one no record can have is a 404 without a look-up."""
    value = request.match_info["id"]
    if not re.fullmatch(RECORD_ID, value):
        raise ApiError(404, f"No {kind} has an id like that: ids are letters, digits, '-' and '.'.")
    return value


def service_name(request: web.Request) -> str:
    return checked(naming.validate_service, request.match_info["name"])
