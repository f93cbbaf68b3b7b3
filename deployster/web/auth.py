"""HTTP basic auth in front of every path, unknown ones included, except the routes listed in
``PUBLIC_ROUTES``.

The original answered its 404 and 405 before auth; here nothing is said to a caller that has
not authenticated. Both parts are compared in constant time.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from deployster.web.errors import ApiError

#: The authenticated user, for records ("actor") and logs.
USER = web.RequestKey("user", str)

CHALLENGE = {"WWW-Authenticate": 'Basic realm="Deployster"'}

#: The only routes served without credentials, by their route template (the resource's
#: canonical path, e.g. ``/hooks/{source}``): what matched the request decides, so an unknown
#: path or one that merely starts like a public one still needs auth. Keep this list short.
PUBLIC_ROUTES: frozenset[str] = frozenset(
    {
        "/healthz",  # liveness probe
        "/readyz",  # readiness probe
        # Webhooks: each source proves it knows its own secret (deployster/web/webhooks.py).
        "/v1/webhooks/dockerhub/{token}",
        "/v1/webhooks/registry",
        "/v1/webhooks/harbor",
        "/v1/webhooks/ghcr",
    }
)


def is_public(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical in PUBLIC_ROUTES


def basic_auth_middleware(username: str, password: str) -> Any:
    expected_user = username.encode()
    expected_password = password.encode()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_public(request):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise ApiError(401, "HTTP basic auth is required.", CHALLENGE)
        try:
            user, sep, given = b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            raise ApiError(
                401, "The Authorization header is not valid basic auth.", CHALLENGE
            ) from None
        # Both comparisons always run, so timing tells nothing about which part was wrong.
        user_ok = hmac.compare_digest(user, expected_user)
        password_ok = hmac.compare_digest(given, expected_password)
        if not (sep and user_ok and password_ok):
            raise ApiError(401, "The username or password is wrong.", CHALLENGE)
        request[USER] = user.decode(errors="replace")
        return await handler(request)

    return authenticate
