"""``GET /v1/version``: plain text, as the original answered it."""

from aiohttp import web

from deployster import __version__

routes = web.RouteTableDef()


@routes.get("/v1/version")
async def version(_: web.Request) -> web.Response:
    return web.Response(text=f"{__version__}\n", content_type="text/plain")
