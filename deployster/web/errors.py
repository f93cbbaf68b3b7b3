"""One JSON error envelope for every error the API answers: ``{"error", "description"}``.

``error`` is a short machine-readable code, ``description`` a sentence that says what to do.
The original's envelope had the same two keys (`docs/compatibility.md` §2.1).
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from deployster.etcd import EtcdError
from deployster.fleet import FleetError

log = structlog.get_logger(__name__)

_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    417: "expectation_failed",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


TOO_LARGE = "The request body is larger than the limit of 1 MiB."  # limits.MAX_BODY


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        description: str,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.headers = headers or {}
        self.close = close  # close the connection after the answer (a body left unread)


def error_response(
    status: int, description: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {
        "error": _CODES.get(status, "error" if status < 500 else "internal_error"),
        "description": description,
    }
    return web.json_response(body, status=status, headers=headers)


def validation_sentence(exc: ValidationError) -> str:
    """The first pydantic error as a sentence naming the field, e.g. ``deploy.version``."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    if err["type"] == "missing":
        return f"The field '{where}' is required."
    return f"The field '{where}' is not valid: {err['msg']}."


def _http_error_description(exc: web.HTTPException, request: web.Request) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"{request.method} {request.path} not found."
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return f"Only {', '.join(sorted(exc.allowed_methods))} are allowed on {request.path}."
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return TOO_LARGE
    return exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.description, exc.headers)
        if exc.close:
            response.force_close()
        return response
    except EtcdError as exc:
        log.warning("etcd_error", path=request.path, reason=str(exc))
        return error_response(
            503, f"Deployster cannot reach its etcd ({exc}); try again when etcd is back."
        )
    except FleetError as exc:
        log.warning("fleet_error", path=request.path, reason=exc.message)
        return error_response(502, f"{exc.message}.")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return error_response(exc.status, _http_error_description(exc, request), headers)
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        return error_response(
            500, "Deployster failed to handle this request; the server log has the details."
        )
