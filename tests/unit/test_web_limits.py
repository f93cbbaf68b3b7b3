"""The request limits of deployster/web/limits.py: JSON depth, duplicate keys, NaN; env and
command bounds; service policy minima."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from deployster.policy import HealthPolicy, ServicePolicy
from deployster.safejson import MAX_JSON_DEPTH, JsonRefusedError, load_json
from deployster.web.errors import ApiError
from deployster.web.limits import (
    MAX_COMMAND_ARGS,
    MAX_ENV_VARS,
    InFlight,
    bounded_command,
    bounded_env,
)


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def test_json_at_the_depth_limit_is_read_and_one_more_is_refused() -> None:
    assert load_json(nested(MAX_JSON_DEPTH)) is not None
    for deep in (nested(MAX_JSON_DEPTH + 1), nested(100_000), b'{"a":' * 50 + b"1" + b"}" * 50):
        with pytest.raises(JsonRefusedError, match="nested deeper"):
            load_json(deep)


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = '["' + "[{" * 1000 + '\\"[[[", "\\\\"]'
    assert load_json(text.encode()) == ["[{" * 1000 + '"[[[', "\\"]


def test_the_depth_scan_costs_less_than_parsing_itself() -> None:
    flat = b"[" + b"[]," * 300_000 + b"[]]"  # about 1 MiB, the body limit
    started = time.monotonic()
    json.loads(flat)
    parsing = time.monotonic() - started
    started = time.monotonic()
    load_json(flat)
    assert time.monotonic() - started < 3 * parsing


@pytest.mark.parametrize(
    "raw,words",
    [
        (b'{"a": 1, "a": 2}', "'a' twice"),
        (b'[{"x": {"b": 1, "b": 1}}]', "'b' twice"),
        (b'{"a": NaN}', "NaN"),
        (b"[Infinity]", "Infinity"),
        (b"{", "not valid JSON"),
        (b"\xff", "not UTF-8"),
        ('["\u00e9"]'.encode("utf-16"), "not UTF-8"),
        # UTF-16 of ASCII is valid UTF-8 (with NULs): scanned as the parser would read it.
        (('["\u2200' + "[" * 100 + '"]').encode("utf-16-le"), "nested deeper"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a byte order mark
        (b"1" * 5000, "not valid JSON"),
    ],
)
def test_json_gets_a_sentence_for_what_it_refuses(raw: bytes, words: str) -> None:
    with pytest.raises(JsonRefusedError, match=words):
        load_json(raw)


def test_env_and_command_bounds() -> None:
    assert bounded_env({"A": "b"}) == {"A": "b"}
    with pytest.raises(ValueError, match=f"at most {MAX_ENV_VARS}"):
        bounded_env({f"V{i}": "" for i in range(MAX_ENV_VARS + 1)})
    with pytest.raises(ValueError, match="bytes"):
        bounded_env({"A": "é" * 40_000})  # 80,000 bytes in UTF-8
    bounded_command(["a"] * MAX_COMMAND_ARGS)
    with pytest.raises(ValueError, match="arguments"):
        bounded_command(["a"] * (MAX_COMMAND_ARGS + 1))
    with pytest.raises(ValueError, match="bytes"):
        bounded_command(["x" * 40_000])


def test_in_flight_refuses_beyond_its_limit_and_frees_its_slots() -> None:
    gate = InFlight(2)
    with gate.slot("bodies"), gate.slot("bodies"):
        with pytest.raises(ApiError) as refused, gate.slot("bodies"):
            pass
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    with gate.slot("bodies"):
        assert gate.count == 1
    assert gate.count == 0


@pytest.mark.parametrize(
    "health",
    [
        {"interval": 1e-9},
        {"interval": 0.09},
        {"timeout": 0.01},
        {"path": "health"},
        {"path": "/a\x00"},
        {"path": "/a\u2028b"},
        {"path": "/a b"},
        {"path": "/a#b"},
        {"path": "/" + "a" * 1024},
    ],
)
def test_health_checks_have_minima_and_a_plain_bounded_path(health: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        HealthPolicy(**health)


def test_the_smallest_accepted_values() -> None:
    HealthPolicy(interval=0.1, timeout=0.1, path="/" + "a" * 1023)
    HealthPolicy(path="/health?deep=1&x=%20")
    ServicePolicy(instance_deadline=1, deploy_deadline=1, drain=0, min_healthy_time=0)
