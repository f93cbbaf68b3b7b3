"""The log pipeline: no frame locals, masking by field name and by known value, last."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pydantic
import pytest
import structlog

from deployster import logs

SECRET = "unit-test-secret-value"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """The logs configured into a buffer; the previous configuration comes back afterwards."""
    saved, root = structlog.get_config(), logging.getLogger()
    saved_handlers, saved_handler = list(root.handlers), logs._stdlib_handler
    buffer = io.StringIO()
    yield buffer
    structlog.configure(**saved)
    root.handlers[:] = saved_handlers
    logs._stdlib_handler = saved_handler


def fail_with_locals() -> None:
    only_in_a_local = "local-variable-value"  # noqa: F841 (a frame local, the point of the test)
    raise ValueError("boom")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_tracebacks_show_no_frame_locals(output: io.StringIO, log_format: str) -> None:
    logs.configure(log_format, stream=output)
    try:
        fail_with_locals()
    except ValueError:
        structlog.get_logger().exception("request_failed")
    text = output.getvalue()
    assert "boom" in text and "fail_with_locals" in text
    assert "local-variable-value" not in text


def test_known_values_are_masked_everywhere_in_the_final_line(output: io.StringIO) -> None:
    logs.configure("json", stream=output)
    logs.register_secret(SECRET)
    try:
        raise RuntimeError(f"cannot open /srv/{SECRET}/x")
    except RuntimeError:
        structlog.get_logger().exception(
            f"event with {SECRET}",
            nested={"deeper": [f"a {SECRET} b", {"x": (SECRET,)}]},
            path=f"/v1/things/{SECRET}",
        )
    text = output.getvalue()
    assert SECRET not in text
    line = json.loads(text)
    assert line["event"] == "event with ***"
    assert line["nested"] == {"deeper": ["a *** b", {"x": ["***"]}]}
    assert "cannot open /srv/***/x" in json.dumps(line["exception"])


def test_fields_named_like_secrets_are_masked_at_any_depth(output: io.StringIO) -> None:
    logs.configure("json", stream=output)
    structlog.get_logger().info(
        "settings", password="pw-not-registered", nested=[{"env": {"A": "x"}, "api_token": "t"}]
    )
    line = json.loads(output.getvalue())
    assert line["password"] == "***"
    assert line["nested"] == [{"env": "***", "api_token": "***"}]


def test_values_shorter_than_the_floor_are_left_alone(output: io.StringIO) -> None:
    logs.configure("json", stream=output)
    logs.register_secret("on", "fail", "debug", "abcdef-floor")
    structlog.get_logger().info("request_failed", flag="on", word="debug", long="abcdef-floor")
    line = json.loads(output.getvalue())
    assert line["event"] == "request_failed"
    assert (line["flag"], line["word"], line["long"]) == ("on", "debug", "***")
    assert logs.MIN_SECRET_LENGTH == 6


def test_the_pipelines_own_fields_are_never_masked_by_value(output: io.StringIO) -> None:
    logs.configure("json", stream=output)
    logs.register_secret("warning")  # e.g. an env value LOG_LEVEL=warning
    structlog.get_logger().warning("probe_failed", reason="a warning")
    line = json.loads(output.getvalue())
    assert (line["level"], line["reason"]) == ("warning", "a ***")


def test_standard_library_lines_go_through_the_same_masking(output: io.StringIO) -> None:
    logs.configure("json", stream=output)
    logs.register_secret(SECRET)
    try:
        raise ConnectionResetError(f"peer went away with {SECRET}")
    except ConnectionResetError:
        logging.getLogger("aiohttp.server").exception("Error handling request %s", SECRET)
    text = output.getvalue()
    assert SECRET not in text
    line = json.loads(text)
    assert line["logger"] == "aiohttp.server" and line["level"] == "error"
    assert line["event"] == "Error handling request ***"
    assert "ConnectionResetError" in json.dumps(line["exception"])


def test_the_registry_keeps_the_newest_values_up_to_its_limit() -> None:
    known = logs.SecretValues(limit=2)
    for value in ("first-value", "second-value", "third-value"):
        known.add(value)
    assert known.mask("first-value second-value third-value") == "first-value *** ***"
    known.add("second-value")  # seen again: now the newest
    known.add("fourth-value")
    assert known.mask("second-value third-value fourth-value") == "*** third-value ***"


def test_a_longer_secret_wins_over_a_secret_it_contains() -> None:
    known = logs.SecretValues()
    known.add("abcdef")
    known.add("abcdefghij")
    assert known.mask("xabcdefghijx abcdef") == "x***x ***"


def test_the_input_quoted_by_a_validation_error_is_masked(output: io.StringIO) -> None:
    logs.configure("json", stream=output)
    long_secret = "x" * 40 + SECRET  # pydantic cuts it short in the middle
    try:
        pydantic.TypeAdapter(dict[str, str]).validate_python(["KEY", long_secret])
    except pydantic.ValidationError:
        structlog.get_logger().exception("failed")
    text = output.getvalue()
    assert "input_value=***, input_type=list" in text
    assert SECRET[-10:] not in text
