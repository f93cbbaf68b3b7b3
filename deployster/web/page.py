"""The status page: ``GET /`` serves its HTML, ``GET /static/{file}`` its stylesheet and script
(files of ``deployster/web/static/``, shipped as package data).

Both sit behind basic auth like the API, so a browser's own prompt is the login. The page reads
only the public API from the browser (``/v1/services``, deploy records and their events
stream, policies, webhook decisions) and fetches nothing from anywhere else, which its
Content-Security-Policy holds it to.
"""

from __future__ import annotations

import pathlib

from aiohttp import web

from deployster.web.errors import ApiError

routes = web.RouteTableDef()

STATIC = pathlib.Path(__file__).with_name("static")
#: The files ``/static/{file}`` serves, with their media types; nothing else is reachable.
FILES = {
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}
HEADERS = {
    # Same origin only: no CDN, font or script from elsewhere can load, even by mistake.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate each time (304 when unchanged), so an upgraded server serves its own page.
    "Cache-Control": "no-cache",
}


def _file(name: str, content_type: str) -> web.FileResponse:
    return web.FileResponse(STATIC / name, headers={**HEADERS, "Content-Type": content_type})


@routes.get("/")
async def index(_: web.Request) -> web.FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@routes.get("/static/{file}")
async def static(request: web.Request) -> web.FileResponse:
    name = request.match_info["file"]
    if name not in FILES:
        raise ApiError(404, f"The status page has no file {name!r}.")
    return _file(name, FILES[name])
