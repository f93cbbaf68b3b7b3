"""Webhook routes: ``POST /v1/webhooks/{dockerhub/{token},registry,harbor,ghcr}`` and
``GET /v1/webhooks/events``.

The POST routes sit outside basic auth (``PUBLIC_ROUTES``): each checks its source's
own secret (``deployster/webhooks.py``) before reading the payload, and answers 404 while no
secret is configured for its source. A bad secret is a 401, a body that is not the
provider's format a 400, and everything else a 202 with the decision for each event, the
reason included: registries retry anything but a 2xx. ``GET /v1/webhooks/events`` (basic
auth) lists the last 100 decisions.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from deployster import webhooks
from deployster.web.context import services
from deployster.web.errors import ApiError
from handlers.webhooks import WebhookHandler

routes = web.RouteTableDef()

Check = Callable[[web.Request, bytes, str], None]
Parse = Callable[[web.Request, bytes], webhooks.Delivery]


def _handler(request: web.Request) -> WebhookHandler:
    handler = services(request).webhooks
    if handler is None:  # an app wired without the webhooks handler
        raise ApiError(404, "This server has no webhooks.")
    return handler


async def _receive(request: web.Request, source: str, check: Check, parse: Parse) -> web.Response:
    handler = _handler(request)
    secret = handler.secret(source)
    if secret is None:
        raise ApiError(
            404,
            f"The {source} webhook is off: set --webhook-secret (or its {source} override) to turn it on.",
        )
    body = await request.read()
    try:
        check(request, body, secret)
        delivery = parse(request, body)
    except webhooks.WebhookUnauthorized as exc:
        handler.rejected(source, str(exc))
        raise ApiError(401, str(exc)) from None
    except webhooks.UnsupportedMediaType as exc:
        handler.rejected(source, str(exc))
        raise ApiError(415, str(exc)) from None
    except webhooks.MalformedPayload as exc:
        handler.rejected(source, str(exc))
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


@routes.post("/v1/webhooks/dockerhub/{token}")
async def dockerhub(request: web.Request) -> web.Response:
    return await _receive(
        request,
        "dockerhub",
        lambda r, _, secret: webhooks.check_token(r.match_info["token"], secret),
        lambda r, body: webhooks.parse_dockerhub(body, r.content_type),
    )


@routes.post("/v1/webhooks/registry")
async def registry(request: web.Request) -> web.Response:
    return await _receive(
        request,
        "registry",
        lambda r, _, secret: webhooks.check_authorization(r.headers.get("Authorization"), secret),
        lambda r, body: webhooks.parse_registry(body, r.content_type),
    )


@routes.post("/v1/webhooks/harbor")
async def harbor(request: web.Request) -> web.Response:
    return await _receive(
        request,
        "harbor",
        lambda r, _, secret: webhooks.check_authorization(r.headers.get("Authorization"), secret),
        lambda r, body: webhooks.parse_harbor(body, r.content_type),
    )


@routes.post("/v1/webhooks/ghcr")
async def ghcr(request: web.Request) -> web.Response:
    return await _receive(
        request,
        "ghcr",
        lambda r, body, secret: webhooks.check_github_signature(
            body, r.headers.get("X-Hub-Signature-256"), secret
        ),
        lambda r, body: webhooks.parse_ghcr(
            body,
            r.content_type,
            r.headers.get("X-GitHub-Event"),
            r.headers.get("X-GitHub-Delivery"),
        ),
    )


@routes.get("/v1/webhooks/events")
async def events(request: web.Request) -> web.Response:
    handler = _handler(request)
    return web.json_response(
        {
            "enabled": handler.enabled,
            "events": [d.model_dump(mode="json") for d in handler.decisions()],
        }
    )
