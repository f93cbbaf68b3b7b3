"""The server about itself: ``GET /v1/version`` (plain text, as the original answered it), and
the probes of orchestrators and load balancers, which need no credentials (``auth.PUBLIC_ROUTES``):

- ``GET /healthz``, liveness: the process runs and answers; it touches nothing else, so a
  restart is never caused by etcd or fleet being down.
- ``GET /readyz``, readiness: etcd and fleet both answer, and the deploy records can be read,
  within ``READY_TIMEOUT`` seconds; else 503 in the error envelope with a sentence naming what
  is down. Callers get no addresses or
  error details (the path is public); the log line has them.
"""

import asyncio
from collections.abc import Awaitable

import structlog
from aiohttp import web

from deployster import __version__
from deployster.etcd import EtcdError
from deployster.fleet import FleetError
from deployster.web.context import services
from deployster.web.errors import ApiError

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

READY_TIMEOUT = 2.0


@routes.get("/v1/version")
async def version(_: web.Request) -> web.Response:
    return web.Response(text=f"{__version__}\n", content_type="text/plain")


@routes.get("/healthz")
async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _down(name: str, check: Awaitable[object]) -> str | None:
    """``name`` when ``check`` fails or takes longer than READY_TIMEOUT, else None."""
    try:
        await asyncio.wait_for(check, READY_TIMEOUT)
    except TimeoutError:
        log.warning(
            "readiness_check_failed", system=name, reason=f"no answer within {READY_TIMEOUT} s"
        )
        return name
    except (EtcdError, FleetError) as exc:
        log.warning("readiness_check_failed", system=name, reason=str(exc))
        return name
    return None


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    parts = services(request)
    etcd, records, fleet = await asyncio.gather(
        _down("etcd", parts.store.ping()),
        _down("records", parts.store.check_records()),
        _down("fleet", parts.fleet.list_machines()),
    )
    down = [name for name in (etcd, fleet) if name]
    if down:
        verb = "is" if len(down) == 1 else "are"
        raise ApiError(503, f"Deployster is not ready: {' and '.join(down)} {verb} unreachable.")
    if records:
        raise ApiError(503, "Deployster is not ready: it cannot read its deploy records in etcd.")
    return web.json_response({"status": "ready", "etcd": "ok", "fleet": "ok"})
