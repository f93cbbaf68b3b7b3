"""fleet's JSON on the wire: what the API sends and how it reads a PUT body.

Sending: every field of fleet's schema is `omitempty`, so an empty string, an
empty list or an empty map is left out, down to `{}` for an empty page. Keys
come in the order of fleet's generated structs (alphabetical), and the encoder
mimics Go's `encoding/json`: compact, non-ASCII as is, and `<`, `>`, `&`,
U+2028, U+2029 escaped as `\\u003c` etc.

Reading: Go's decoder is lenient in ways clients may rely on, so
`decode_unit_request` is too: keys match field names case-insensitively,
unknown keys are ignored, `null` leaves a field empty, and anything after the
first JSON value is ignored. A wrong type is an error (400). One deliberate
difference: a `null` inside `options` is refused with 400, where fleet would
crash the request.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .model import Machine, UnitOption, UnitState

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class InvalidRequestBody(ValueError):
    """The body of a request does not decode into fleet's schema."""


def go_json_dumps(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    for char, escape in _GO_ESCAPES.items():
        text = text.replace(char, escape)
    return text


def error_entity(code: int, message: str) -> dict[str, Any]:
    """fleet's error body; `message` is always present, empty for most 500s."""
    return {"error": {"code": code, "message": message}}


def _omit_empty(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value}


def option_json(option: UnitOption) -> dict[str, Any]:
    return _omit_empty({"name": option.name, "section": option.section, "value": option.value})


def unit_json(
    name: str, options: Sequence[UnitOption], desired_state: str, current_state: str | None, machine_id: str | None
) -> dict[str, Any]:
    return _omit_empty(
        {
            "currentState": current_state,
            "desiredState": desired_state,
            "machineID": machine_id,
            "name": name,
            "options": [option_json(option) for option in options],
        }
    )


def unit_state_json(state: UnitState) -> dict[str, Any]:
    return _omit_empty(
        {
            "hash": state.hash,
            "machineID": state.machine_id,
            "name": state.name,
            "systemdActiveState": state.active_state,
            "systemdLoadState": state.load_state,
            "systemdSubState": state.sub_state,
        }
    )


def machine_json(machine: Machine) -> dict[str, Any]:
    return _omit_empty({"id": machine.id, "metadata": dict(machine.metadata), "primaryIP": machine.primary_ip})


def page_json(key: str, items: Iterable[dict[str, Any]], next_page_token: str | None) -> dict[str, Any]:
    fields = {key: list(items), "nextPageToken": next_page_token}
    return _omit_empty(dict(sorted(fields.items())))


@dataclasses.dataclass(frozen=True)
class UnitRequest:
    """The fields of a PUT body that fleet acts on; an empty string means absent."""

    name: str = ""
    options: tuple[UnitOption, ...] = ()
    desired_state: str = ""


def decode_unit_request(body: bytes) -> UnitRequest:
    value = _decode_first_json_value(body)
    if value is None:
        return UnitRequest()
    fields = _object_fields(value, "schema.Unit")
    for key in ("currentstate", "machineid"):
        _string_field(fields, key)  # read-only, but Go still type-checks them
    options = fields.get("options")
    if options is not None and (isinstance(options, _JsonObject) or not isinstance(options, list)):
        raise InvalidRequestBody(f"json: cannot unmarshal {_json_kind(options)} into Go struct field Unit.options")
    return UnitRequest(
        name=_string_field(fields, "name"),
        options=tuple(_decode_option(item) for item in options or ()),
        desired_state=_string_field(fields, "desiredstate"),
    )


def _decode_first_json_value(body: bytes) -> Any:
    text = body.decode("utf-8", errors="replace")
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        raise InvalidRequestBody("EOF")
    decoder = json.JSONDecoder(object_pairs_hook=_JsonObject, parse_constant=_reject_constant)
    try:
        value, _ = decoder.raw_decode(stripped)
    except ValueError as exc:
        raise InvalidRequestBody(str(exc)) from exc
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


class _JsonObject(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in order, so that Go's case-insensitive, last-wins match can be replayed."""


def _object_fields(value: Any, type_name: str) -> dict[str, Any]:
    if not isinstance(value, _JsonObject):
        raise InvalidRequestBody(f"json: cannot unmarshal {_json_kind(value)} into Go value of type {type_name}")
    fields: dict[str, Any] = {}
    for key, item in value:
        fields[key.lower()] = item
    return fields


def _string_field(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestBody(f"json: cannot unmarshal {_json_kind(value)} into Go struct field of type string")
    return value


def _decode_option(item: Any) -> UnitOption:
    if item is None:
        raise InvalidRequestBody("null is not a valid unit option")
    fields = _object_fields(item, "schema.UnitOption")
    return UnitOption(
        section=_string_field(fields, "section"),
        name=_string_field(fields, "name"),
        value=_string_field(fields, "value"),
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, _JsonObject):
        return "object"
    return "array"


@dataclasses.dataclass(frozen=True)
class MetadataOp:
    """One JSON-Patch operation of `PATCH /machines`."""

    op: str
    path: str
    value: str


def decode_metadata_ops(body: bytes) -> list[MetadataOp]:
    """The body of `PATCH /machines`; `value` must be an object `{"value": "..."}` (fleet-api.md §2, PATCH quirk)."""
    value = _decode_first_json_value(body)
    if value is None:
        return []
    if isinstance(value, _JsonObject) or not isinstance(value, list):
        raise InvalidRequestBody(f"json: cannot unmarshal {_json_kind(value)} into Go value of type []api.machineMetadataOp")
    ops = []
    for item in value:
        if item is None:
            ops.append(MetadataOp("", "", ""))
            continue
        fields = _object_fields(item, "api.machineMetadataOp")
        inner = fields.get("value")
        inner_value = "" if inner is None else _string_field(_object_fields(inner, "struct"), "value")
        ops.append(MetadataOp(_string_field(fields, "op"), _string_field(fields, "path"), inner_value))
    return ops
