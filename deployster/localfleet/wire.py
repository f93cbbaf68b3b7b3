"""fleet's JSON as the server writes and reads it, over the shapes of `deployster.fleet`.

The shapes themselves, their `omitempty` output (`to_wire`) and their lenient
reading of keys are defined once, in `deployster/fleet.py`, for the client and
for this server. This module adds what only a server needs.

Sending: `unit_json`, `page_json` and `error_entity` build the bodies the API
answers with, and `go_json_dumps` writes them as Go's `encoding/json` does:
compact, non-ASCII as is, and `<`, `>`, `&`, U+2028, U+2029 escaped as
`\\u003c` etc.

Reading: like Go's `json.Decoder`, only the first JSON value of a body counts
and anything after it is ignored. Keys are folded in the order they come, so
that when two keys match one field case-insensitively the last one wins, as in
Go; the shapes then ignore unknown keys, treat `null` as empty and refuse a
wrong type, which is `InvalidRequestBodyError` (400). One deliberate difference: a
`null` inside `options` is refused with 400, where fleet would crash the request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from deployster.fleet import (
    ErrorEntity,
    ErrorResponse,
    Machine,
    MachineMetadataOp,
    MachinePage,
    Unit,
    UnitOption,
    UnitPage,
    UnitState,
    UnitStatePage,
    _Shape,
    first_problem,
)

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}

_PAGES: dict[str, tuple[type[UnitPage | UnitStatePage | MachinePage], type[_Shape]]] = {
    "units": (UnitPage, Unit),
    "states": (UnitStatePage, UnitState),
    "machines": (MachinePage, Machine),
}

# A `null` operation decodes to an empty one, which the API then refuses as an invalid op.
_METADATA_OPS = TypeAdapter(list[MachineMetadataOp | None])


class InvalidRequestBodyError(ValueError):
    """The body of a request does not decode into fleet's schema."""


def go_json_dumps(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    for char, escape in _GO_ESCAPES.items():
        text = text.replace(char, escape)
    return text


def error_entity(code: int, message: str) -> dict[str, Any]:
    return ErrorEntity(error=ErrorResponse(code=code, message=message)).to_wire()


def unit_shape(
    name: str,
    options: Sequence[UnitOption],
    desired_state: str,
    current_state: str | None,
    machine_id: str | None,
) -> Unit:
    """A unit as fleet shows it; `None` (like an empty string) leaves the state or the machine out."""
    return Unit(
        name=name,
        options=tuple(options),
        desired_state=desired_state,
        current_state=current_state or "",
        machine_id=machine_id or "",
    )


def unit_json(
    name: str,
    options: Sequence[UnitOption],
    desired_state: str,
    current_state: str | None,
    machine_id: str | None,
) -> dict[str, Any]:
    return unit_shape(name, options, desired_state, current_state, machine_id).to_wire()


def page_json(key: str, items: Iterable[Any], next_page_token: str | None) -> dict[str, Any]:
    """The page of `key` (`units`, `states` or `machines`); `items` are shapes or their JSON.
    Shapes are not read again: a page costs its items' writing only."""
    page_type, item_type = _PAGES[key]
    shapes = tuple(
        item if isinstance(item, item_type) else item_type.model_validate(item) for item in items
    )
    fields: dict[str, Any] = {key: shapes, "next_page_token": next_page_token or ""}
    return page_type.model_construct(**fields).to_wire()


def unit_text(unit: Unit) -> str:
    """One unit's JSON text, as a page of units writes it."""
    return go_json_dumps(unit.to_wire())


def units_page_json(units_json: Sequence[str], next_page_token: str | None) -> str:
    """The text `go_json_dumps(page_json("units", ...))` writes, from units already written
    (`unit_text`): keys in order, an empty token or list left out."""
    fields = []
    if next_page_token:
        fields.append(f'"nextPageToken":{go_json_dumps(next_page_token)}')
    if units_json:
        fields.append(f'"units":[{",".join(units_json)}]')
    return "{" + ",".join(fields) + "}"


def decode_unit_request(body: bytes) -> Unit:
    """The body of `PUT /units/{name}`; an empty field means absent."""
    value = _decode_first_json_value(body)
    if value is None:
        return Unit()
    try:
        return Unit.model_validate(value)
    except ValidationError as exc:
        raise InvalidRequestBodyError(first_problem(exc)) from exc


def decode_metadata_ops(body: bytes) -> list[MachineMetadataOp]:
    """The body of `PATCH /machines`, a list of JSON-Patch operations."""
    value = _decode_first_json_value(body)
    if value is None:
        return []
    try:
        ops = _METADATA_OPS.validate_python(value)
    except ValidationError as exc:
        raise InvalidRequestBodyError(first_problem(exc)) from exc
    return [op or MachineMetadataOp() for op in ops]


def _decode_first_json_value(body: bytes) -> Any:
    text = body.decode("utf-8", errors="replace")
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        raise InvalidRequestBodyError("EOF")
    decoder = json.JSONDecoder(object_pairs_hook=_fold_keys, parse_constant=_reject_constant)
    try:
        value, _ = decoder.raw_decode(stripped)
    except ValueError as exc:
        raise InvalidRequestBodyError(str(exc)) from exc
    return value


def _fold_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A dict keeps the first position of a repeated key; folding pair by pair keeps Go's "last one wins".
    # No shape read here has a map field, whose keys would have to stay as they are.
    return {key.lower(): value for key, value in pairs}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")
