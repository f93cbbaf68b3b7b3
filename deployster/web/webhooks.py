"""Webhook routes: ``POST /v1/webhooks/{dockerhub/{token},registry,harbor,ghcr}`` and
``GET /v1/webhooks/events``.

The POST routes sit outside basic auth (``PUBLIC_ROUTES``): each checks its source's
own secret (``deployster/webhooks.py``) from the path or the headers before it reads a byte
of the body (GHCR, whose signature covers the body, has its signature's form checked first
and at most ``limits.MAX_UNVERIFIED`` bodies read at once before the signature is checked),
and answers 404 while no secret is configured for its source. Bodies are read within the
size limit and deadline of ``deployster/web/limits.py``. A bad secret is a 401, a body that
is not the provider's format a 400, and everything else a 202 with the decision for each
event, the reason included: registries retry anything but a 2xx. ``GET /v1/webhooks/events`` (basic
auth) lists the last 100 decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from deployster import webhooks
from deployster.web.context import services
from deployster.web.errors import ApiError
from deployster.web.limits import UNVERIFIED_KEY, read_body
from handlers.webhooks import WebhookHandler

routes = web.RouteTableDef()


@dataclass(frozen=True)
class _Source:
    name: str
    # Checks the secret from the path or the headers, before a byte of the body is read.
    credential: Callable[[web.Request, str], None]
    parse: Callable[[web.Request, bytes], webhooks.Delivery]
    # GHCR signs the body: checked once it is read (a bounded number at once meanwhile).
    signature: Callable[[web.Request, bytes, str], None] | None = None


def _handler(request: web.Request) -> WebhookHandler:
    handler = services(request).webhooks
    if handler is None:  # an app wired without the webhooks handler
        raise ApiError(404, "This server has no webhooks.")
    return handler


async def _receive(request: web.Request, source: _Source) -> web.Response:
    handler = _handler(request)
    secret = handler.secret(source.name)
    if secret is None:
        raise ApiError(
            404,
            f"The {source.name} webhook is off: set --webhook-secret (or its {source.name} "
            "override) to turn it on.",
        )
    try:
        source.credential(request, secret)
        if source.signature is None:
            body = await read_body(request)
        else:
            with request.app[UNVERIFIED_KEY].slot("webhook bodies not yet verified"):
                body = await read_body(request)
            source.signature(request, body, secret)
        delivery = source.parse(request, body)
    except webhooks.WebhookUnauthorizedError as exc:
        handler.rejected(source.name, str(exc), stranger=True)
        raise ApiError(401, str(exc)) from None
    except webhooks.UnsupportedMediaTypeError as exc:
        handler.rejected(source.name, str(exc))
        raise ApiError(415, str(exc)) from None
    except webhooks.MalformedPayloadError as exc:
        handler.rejected(source.name, str(exc))
        raise ApiError(400, str(exc)) from None
    try:
        decisions = await handler.receive(delivery)
    except TimeoutError:
        raise ApiError(
            503, "Deployster could not decide on the push in time; send it again."
        ) from None
    return web.json_response(
        {"decisions": [d.model_dump(mode="json") for d in decisions]}, status=202
    )


DOCKERHUB = _Source(
    "dockerhub",
    lambda r, secret: webhooks.check_token(r.match_info["token"], secret),
    lambda r, body: webhooks.parse_dockerhub(body, r.content_type),
)
REGISTRY = _Source(
    "registry",
    lambda r, secret: webhooks.check_bearer(r.headers.get("Authorization"), secret),
    lambda r, body: webhooks.parse_registry(body, r.content_type),
)
HARBOR = _Source(
    "harbor",
    lambda r, secret: webhooks.check_harbor_auth(r.headers.get("Authorization"), secret),
    lambda r, body: webhooks.parse_harbor(body, r.content_type),
)
GHCR = _Source(
    "ghcr",
    lambda r, _: webhooks.github_signature_given(r.headers.get("X-Hub-Signature-256")),
    lambda r, body: webhooks.parse_ghcr(
        body, r.content_type, r.headers.get("X-GitHub-Event"), r.headers.get("X-GitHub-Delivery")
    ),
    signature=lambda r, body, secret: webhooks.check_github_signature(
        body, r.headers.get("X-Hub-Signature-256"), secret
    ),
)


@routes.post("/v1/webhooks/dockerhub/{token}")
async def dockerhub(request: web.Request) -> web.Response:
    return await _receive(request, DOCKERHUB)


@routes.post("/v1/webhooks/registry")
async def registry(request: web.Request) -> web.Response:
    return await _receive(request, REGISTRY)


@routes.post("/v1/webhooks/harbor")
async def harbor(request: web.Request) -> web.Response:
    return await _receive(request, HARBOR)


@routes.post("/v1/webhooks/ghcr")
async def ghcr(request: web.Request) -> web.Response:
    return await _receive(request, GHCR)


@routes.get("/v1/webhooks/events")
async def events(request: web.Request) -> web.Response:
    handler = _handler(request)
    return web.json_response(
        {
            "enabled": handler.enabled,
            "events": [d.model_dump(mode="json") for d in handler.decisions()],
        }
    )
