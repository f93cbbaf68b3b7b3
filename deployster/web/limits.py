"""What a request may send, in one place: body size and read deadline, JSON depth, sizes
of env and commands, aiohttp's connection limits, when "100 Continue" is said, and the number
of webhook bodies read before their sender has proved anything.

Every limit answers in the JSON error envelope: 413 for a body over the size limit, 408 for
a body that does not arrive within the deadline (the connection is closed), 400 for JSON
that is not valid, nested too deep, has a key twice or a NaN/Infinity, 417 for an unknown
``Expect``, 503 for a webhook body beyond the unverified ones in flight. The README's
"Security / Limits" lists them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from deployster.web.errors import TOO_LARGE, ApiError, error_response

MAX_BODY = 1024 * 1024  # bytes of a request body (aiohttp's client_max_size as well)
BODY_TIMEOUT = 10.0  # seconds to receive a whole request body (setting --body-timeout)
MAX_ENV_VARS = 256  # environment variables of a deploy or a task
MAX_ENV_BYTES = 64 * 1024  # their names and values together, UTF-8
MAX_COMMAND_ARGS = 512  # arguments of a task's command
MAX_COMMAND_BYTES = 32 * 1024  # the command's arguments together, UTF-8
MAX_EVENT_ID = 18  # digits of a Last-Event-ID
MAX_UNVERIFIED = 16  # webhook bodies read at once before their signature is checked (GHCR)

#: aiohttp's connection settings (``web.Application(handler_args=...)``): an idle connection,
#: or one that has not finished its request headers, is closed after ``keepalive_timeout``
#: seconds; a body left unread after the answer is read and dropped for ``lingering_time``
#: at most, then the connection is closed; a header line may have 8190 bytes, a request 128
#: header lines.
HANDLER_ARGS: dict[str, Any] = {
    "keepalive_timeout": 30.0,
    "lingering_time": 2.0,
    "max_line_size": 8190,
    "max_field_size": 8190,
    "max_headers": 128,
}

BODY_TIMEOUT_KEY = web.AppKey("body_timeout", float)


async def defer_continue(request: web.Request) -> web.Response | None:
    """Every route's ``expect_handler``: aiohttp's own says "100 Continue" before any
    middleware runs, so a client without credentials would be invited to send its body.
    Here an ``Expect`` other than ``100-continue`` is a 417 and the 100 waits for read_body."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(417, "Only 'Expect: 100-continue' is understood.")
    return None


async def read_body(request: web.Request) -> bytes:
    """The whole body within the size limit and the app's read deadline, else a 413 or 408.
    A client that waits for "100 Continue" gets it now, past auth and every check before."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, TOO_LARGE, close=True)
    if (
        request.version == HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer itself has not begun (as aiohttp does)
    deadline = request.app[BODY_TIMEOUT_KEY]
    try:
        async with asyncio.timeout(deadline):
            return await request.read()  # a 413 past the app's client_max_size (MAX_BODY)
    except TimeoutError:
        raise ApiError(
            408,
            f"The request body did not arrive within {deadline:g} s; send it whole and at once.",
            close=True,
        ) from None
    except HttpProcessingError as exc:  # e.g. a broken chunked encoding
        raise ApiError(400, f"The request body is not valid HTTP: {exc.message}.") from None
    except ConnectionError:  # the client went away mid-body: nobody to answer, nothing to log
        raise ApiError(400, "The connection closed before the body ended.", close=True) from None


def bounded_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` within MAX_ENV_VARS and MAX_ENV_BYTES, else ValueError (a pydantic validator)."""
    if len(env) > MAX_ENV_VARS:
        raise ValueError(f"at most {MAX_ENV_VARS} environment variables are allowed")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > MAX_ENV_BYTES:
        raise ValueError(f"the environment has {size} bytes, more than {MAX_ENV_BYTES}")
    return env


def bounded_command(parts: list[str]) -> None:
    """A command within MAX_COMMAND_ARGS and MAX_COMMAND_BYTES, else ValueError."""
    if len(parts) > MAX_COMMAND_ARGS:
        raise ValueError(f"the command has more than {MAX_COMMAND_ARGS} arguments")
    size = sum(len(part.encode()) for part in parts)
    if size > MAX_COMMAND_BYTES:
        raise ValueError(f"the command has {size} bytes, more than {MAX_COMMAND_BYTES}")


class InFlight:
    """At most ``limit`` requests at once in a section; beyond that a 503 to retry later."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    @contextmanager
    def slot(self, what: str) -> Iterator[None]:
        if self.count >= self.limit:
            raise ApiError(
                503,
                f"Deployster is reading {self.limit} {what} already; send it again shortly.",
                {"Retry-After": "1"},
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


UNVERIFIED_KEY = web.AppKey("unverified", InFlight)
