"""Logging with structlog: JSON lines for machines, a readable console for people.

Every line is one event name plus fields. Lines written while a deploy is handled carry its
``service`` and ``deploy_id`` through contextvars (bound by the bus). A last processor masks
any field whose name says it holds a secret, so a careless ``log.info(..., password=...)``
still never reaches the output.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

_SECRET_FIELD = re.compile(r"pass(word)?|secret|token|authorization|credential|env$", re.I)
# Docker Hub's webhook URL carries its secret as the last path segment.
_SECRET_PATH = re.compile(r"^(/v1/webhooks/dockerhub/)[^/]+")


def _mask_secrets(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in event_dict:
        if key != "event" and _SECRET_FIELD.search(key):
            event_dict[key] = "***"
        elif key == "path" and isinstance(event_dict[key], str):
            event_dict[key] = _SECRET_PATH.sub(r"\1***", event_dict[key])
    return event_dict


def configure(log_format: str = "auto") -> None:
    """``auto`` picks console on a terminal and JSON otherwise."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.dict_tracebacks
            if use_json
            else structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log as structured lines; the query string is left out (it may carry
    tokens) and so is every header."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        structlog.get_logger("deployster.access").info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(time * 1000, 1),
            remote=request.remote,
        )

    @property
    def enabled(self) -> bool:
        return True
