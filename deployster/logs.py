"""Logging with structlog: JSON lines for machines, a readable console for people.

Every line is one event name plus fields. Lines written while a deploy is handled carry its
``service`` and ``deploy_id`` through contextvars (bound by the bus). Lines of the standard
library's loggers (aiohttp's own error lines, asyncio) go through the same processors, so they
are rendered and masked alike.

Secrets never reach the output. Tracebacks are rendered without frame locals (a frame of the
auth middleware holds the API password, one of a deploy its ``env``). Masking is the last step
before rendering, applied to the final event with its exception text (rendered into plain strings
and dicts by then), through nested dicts and lists, keys included:

* by field name: a field whose name says it holds a secret (``password``, ``token``, ``env``,
  ...) is replaced whole, so a careless ``log.info(..., password=...)`` shows ``***``;
* by value: the process registers the secrets it knows (``register_secret``: the API password
  and webhook secrets at start, every deploy's ``env`` values when they are read) and every
  occurrence of one in any string is replaced by ``***`` (except the fields the pipeline itself
  writes: level, timestamp, logger). Values shorter than ``MIN_SECRET_LENGTH`` are not masked
  by value: masking ``1``, ``true`` or ``fail`` in every line would make the logs useless and
  such a value protects little;
* the input quoted in a pydantic validation error (``input_value=...``) is replaced whole: it
  may hold a secret cut short, which no value matches.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, TextIO

import ahocorasick
import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import Processor

MASK = "***"
#: Shorter values are masked by field name only, never by value: env values such as ``true``,
#: ``fail`` or ``debug`` would otherwise turn every ``request_failed`` into ``request_***ed``.
MIN_SECRET_LENGTH = 6
# Env values of old deploys give way to new ones past this many (a record read again
# registers its values again).
MAX_SECRETS = 10_000

_SECRET_FIELD = re.compile(r"pass(word)?|secret|token|authorization|credential|env$", re.I)
# Docker Hub's webhook URL carries its secret as the last path segment.
_SECRET_PATH = re.compile(r"^(/v1/webhooks/dockerhub/)[^/]+")
# pydantic's validation errors quote the input, cut short in the middle when long: a secret
# would show only in part, which masking by value cannot find.
_PYDANTIC_INPUT = re.compile(r"(input_value=).*?(, input_type=)")


class SecretValues:
    """The secret values this process knows, found in a text in one pass (Aho-Corasick)."""

    def __init__(self, limit: int = MAX_SECRETS) -> None:
        self._limit = limit
        self._values: dict[str, None] = {}  # insertion order: the oldest goes first
        self._automaton: ahocorasick.Automaton | None = None  # None: rebuild before use
        self._lock = threading.Lock()  # stdlib logging may run in other threads

    def add(self, value: str) -> None:
        if len(value) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            if value in self._values:
                self._values[value] = self._values.pop(value)  # now the newest
                return
            self._values[value] = None
            while len(self._values) > self._limit:
                del self._values[next(iter(self._values))]
            self._automaton = None

    def _current(self) -> ahocorasick.Automaton | None:
        with self._lock:
            if self._automaton is None and self._values:
                automaton = ahocorasick.Automaton()
                for value in self._values:
                    automaton.add_word(value, len(value))
                automaton.make_automaton()
                self._automaton = automaton  # never changed again: safe to share
            return self._automaton

    def mask(self, text: str) -> str:
        """``text`` with every known value replaced by ``***`` (leftmost, longest first)."""
        automaton = self._current()
        if automaton is None:
            return text
        parts, start = [], 0
        for end, length in automaton.iter_long(text):
            parts += [text[start : end - length + 1], MASK]
            start = end + 1
        return "".join(parts) + text[start:] if parts else text


SECRETS = SecretValues()
_stdlib_handler: logging.Handler | None = None  # the one configure() installed last


def register_secret(*values: str | None) -> None:
    """Never log these values (the empty and the too short ones are ignored)."""
    for value in values:
        if value:
            SECRETS.add(value)


def register_env(env: dict[str, str]) -> dict[str, str]:
    """Register a deploy's or task's env values; returns ``env`` (for use in validators)."""
    register_secret(*env.values())
    return env


# Written by the pipeline, never from input: an env value such as ``warning`` must not mask
# the level of every warning.
_OWN_FIELDS = frozenset({"level", "timestamp", "logger"})


def _masked(value: Any, key: str = "") -> Any:
    if key and key != "event" and _SECRET_FIELD.search(key):
        return MASK
    if key in _OWN_FIELDS:
        return value
    if isinstance(value, str):
        if key == "path":
            value = _SECRET_PATH.sub(rf"\1{MASK}", value)
        return SECRETS.mask(_PYDANTIC_INPUT.sub(rf"\1{MASK}\2", value))
    if isinstance(value, dict):
        return {SECRETS.mask(str(k)): _masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked(v) for v in value]
    return value


def mask_secrets(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """The last processor before rendering: mask by field name and by known value."""
    return {k: _masked(v, k) for k, v in event_dict.items()}


def _final_processors(use_json: bool) -> list[Any]:
    """Exception rendering (no locals), masking, rendering: shared by structlog's and the
    standard library's lines."""
    if use_json:
        exceptions: Any = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )
        renderer: Any = structlog.processors.JSONRenderer()
    else:
        # A plain traceback string: the console renderer's rich and better-exceptions
        # formatters would show frame locals.
        exceptions = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    return [exceptions, mask_secrets, renderer]


def configure(log_format: str = "auto", stream: TextIO | None = None) -> None:
    """``auto`` picks console on a terminal and JSON otherwise; lines go to ``stream``
    (standard error by default)."""
    out = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not out.isatty())
    final = _final_processors(use_json)
    common: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *common, *final],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *common],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    global _stdlib_handler
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    _stdlib_handler = handler
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


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
