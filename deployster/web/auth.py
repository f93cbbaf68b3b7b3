"""HTTP basic auth in front of every path, unknown ones included.

The original answered its 404 and 405 before auth; here nothing is said to a caller that has
not authenticated. Both parts are compared in constant time.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from deployster.web.errors import ApiError

#: The authenticated user, for records ("actor") and logs.
USER = web.RequestKey("user", str)

CHALLENGE = {"WWW-Authenticate": 'Basic realm="Deployster"'}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def own_authentication(handler: Handler) -> Handler:
    """Mark a route that authenticates its callers itself, outside basic auth (the webhooks:
    each source proves it knows its own secret)."""
    setattr(handler, "own_authentication", True)
    return handler


def basic_auth_middleware(username: str, password: str) -> Any:
    expected_user = username.encode()
    expected_password = password.encode()

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        if getattr(request.match_info.handler, "own_authentication", False):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise ApiError(401, "HTTP basic auth is required.", CHALLENGE)
        try:
            user, sep, given = b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            raise ApiError(401, "The Authorization header is not valid basic auth.", CHALLENGE) from None
        # Both comparisons always run, so timing tells nothing about which part was wrong.
        user_ok = hmac.compare_digest(user, expected_user)
        password_ok = hmac.compare_digest(given, expected_password)
        if not (sep and user_ok and password_ok):
            raise ApiError(401, "The username or password is wrong.", CHALLENGE)
        request[USER] = user.decode(errors="replace")
        return await handler(request)

    return authenticate
