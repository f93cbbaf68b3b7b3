"""``GET /metrics``: the server's Prometheus metrics (behind basic auth like the API; give
Prometheus the credentials with ``basic_auth`` in its scrape config)."""

from aiohttp import web

from deployster.metrics import CONTENT_TYPE
from deployster.web.context import services

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=services(request).metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response
