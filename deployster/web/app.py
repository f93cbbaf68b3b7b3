"""The aiohttp application: middlewares, limits, and the routes of each resource; and its
runner, which answers aiohttp's own protocol errors in the JSON envelope too."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_request import BaseRequest

from deployster.web import (
    deploys,
    meta,
    metrics,
    notifications,
    openapi,
    page,
    policies,
    tasks,
    webhooks,
)
from deployster.web.auth import basic_auth_middleware
from deployster.web.context import CLOSING, SERVICES, Services
from deployster.web.errors import error_middleware, error_response
from deployster.web.limits import (
    BODY_TIMEOUT,
    BODY_TIMEOUT_KEY,
    HANDLER_ARGS,
    MAX_BODY,
    MAX_UNVERIFIED,
    UNVERIFIED_KEY,
    InFlight,
    defer_continue,
)

log = structlog.get_logger(__name__)


def create_app(
    services: Services, username: str, password: str, body_timeout: float = BODY_TIMEOUT
) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[
            # A client URL with a trailing slash asks for //v1/...: a permanent redirect (308,
            # method and body kept) to the path with single slashes, as the 2015 server
            # redirected it; never a 404 that an old client would show as an empty table.
            web.normalize_path_middleware(append_slash=False, merge_slashes=True),
            error_middleware,
            basic_auth_middleware(username, password),
        ],
        handler_args=HANDLER_ARGS,
    )
    app[SERVICES] = services
    app[CLOSING] = asyncio.Event()
    app[BODY_TIMEOUT_KEY] = body_timeout
    app[UNVERIFIED_KEY] = InFlight(MAX_UNVERIFIED)

    async def end_streams(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(end_streams)
    for table in (meta, deploys, policies, metrics, openapi, webhooks, tasks, notifications, page):
        for route in table.routes:
            assert isinstance(route, web.RouteDef)
            # "Expect: 100-continue" is answered when the route reads the body (read_body),
            # after auth and the webhook secrets: never to a sender that has not proved itself.
            add = getattr(app.router, f"add_{route.method.lower()}")  # add_get adds HEAD
            add(route.path, route.handler, expect_handler=defer_continue, **route.kwargs)
    return app


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, with its answers to requests that are not valid HTTP
    (a bad method or request line, a header line over 8190 bytes, a broken header) in the
    JSON envelope instead of plain text, logged without the request's bytes."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # aiohttp's own handling logs the traceback (and refuses once an answer has begun).
            super().handle_error(request, status, exc, message)
            description = (
                "Deployster failed to handle this request; the server log has the details."
            )
        else:
            if request.writer.output_size > 0:  # as aiohttp: an answer has begun already
                raise ConnectionError("An answer has begun; no error answer can follow.")
            log.info("bad_http_request", status=status, reason=type(exc).__name__)
            description = (
                "A header line or the request line is longer than 8190 bytes."
                if isinstance(exc, LineTooLong)
                else f"The request is not valid HTTP ({type(exc).__name__})."
            )
        response = error_response(status, description)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer protocol errors in the JSON envelope."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        kwargs: dict[str, Any] = server._kwargs
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **kwargs,
        )
