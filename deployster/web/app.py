"""The aiohttp application: middlewares, limits, and the routes of each resource."""

from __future__ import annotations

import asyncio

from aiohttp import web

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
from deployster.web.errors import error_middleware

MAX_BODY = 1024 * 1024


def create_app(services: Services, username: str, password: str) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[error_middleware, basic_auth_middleware(username, password)],
    )
    app[SERVICES] = services
    app[CLOSING] = asyncio.Event()

    async def end_streams(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(end_streams)
    app.add_routes(meta.routes)
    app.add_routes(deploys.routes)
    app.add_routes(policies.routes)
    app.add_routes(metrics.routes)
    app.add_routes(openapi.routes)
    app.add_routes(webhooks.routes)
    app.add_routes(tasks.routes)
    app.add_routes(notifications.routes)
    app.add_routes(page.routes)
    return app
