"""``GET /v1/services/{name}/notifications``: the service's pending notifications and the last
that ended, newest first (receivers by origin only; never a body, a header or a secret)."""

from __future__ import annotations

from aiohttp import web

from deployster.web.context import services
from deployster.web.errors import ApiError
from deployster.web.inputs import service_name

routes = web.RouteTableDef()


@routes.get("/v1/services/{name}/notifications")
async def list_notifications(request: web.Request) -> web.Response:
    service = service_name(request)
    notifier = services(request).notifier
    if notifier is None:
        raise ApiError(404, "This server sends no notifications.")
    found = await notifier.deliveries(service)
    return web.json_response({"notifications": [o.model_dump(mode="json") for o in found]})
