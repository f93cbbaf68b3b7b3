"""JSON from outside, parsed so that no input can cost more than its size: UTF-8 only, nesting
bounded before parsing, no key twice in one object, no NaN or Infinity. Request bodies and
webhook payloads both come through here."""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_JSON_DEPTH = 32  # nesting of arrays and objects; Deployster's own bodies need 4

# Nesting is measured on the brackets outside JSON strings (escapes included), in C loops.
_JSON_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class JsonRefusedError(ValueError):
    """The body is not JSON Deployster takes; the message is a sentence for the caller."""


def load_json(raw: bytes) -> Any:
    """``raw`` as JSON, refused (JsonRefusedError) when not UTF-8 or not valid, nested deeper than
    MAX_JSON_DEPTH, holding a key twice in one object, or NaN/Infinity.

    UTF-8 only (as RFC 8259 asks of JSON between systems): in UTF-16 a quote or bracket byte
    can be half of another character, which would hide nesting from the scan."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefusedError(
            f"The body is not UTF-8: {exc.reason} at byte {exc.start}."
        ) from None
    brackets = _JSON_STRINGS.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if brackets and max(accumulate(map(_DEPTH_STEP.__getitem__, brackets))) > MAX_JSON_DEPTH:
        raise JsonRefusedError(
            f"The JSON is nested deeper than {MAX_JSON_DEPTH} arrays or objects."
        )
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except JsonRefusedError:
        raise
    except ValueError as exc:
        raise JsonRefusedError(f"The body is not valid JSON: {exc}.") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise JsonRefusedError(f"The JSON has the key {twice[:100]!r} twice in one object.")
    return result


def _no_constant(name: str) -> Any:
    raise JsonRefusedError(f"The JSON holds {name}, which is not a number JSON allows.")
