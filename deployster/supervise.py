"""Background tasks that never die silently: a crash is logged and the task restarted.

Every long-lived loop of the server (the instances watch, the probe scheduler, the reaper, each
service's deploy worker) runs under :func:`supervised`: an exception is
logged with the task's name and the loop is started again after a backoff that doubles up to
``maximum`` (and starts over after a long healthy run), as an init system restarts a service.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

BACKOFF_INITIAL, BACKOFF_MAX = 0.2, 10.0
HEALTHY_RUN = 60.0  # seconds without a crash after which the backoff starts over


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    initial: float = BACKOFF_INITIAL,
    maximum: float = BACKOFF_MAX,
) -> None:
    """Run ``run()`` until cancelled, restarting it with backoff whenever it raises or
    returns (a loop that returns has stopped doing its work as surely as one that raised)."""
    backoff = initial
    while True:
        started = time.monotonic()
        try:
            await run()
            log.warning("task_ended", task=name, restart_in=backoff)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task_crashed", task=name, restart_in=backoff)
        if time.monotonic() - started > HEALTHY_RUN:
            backoff = initial
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, maximum)


def start_supervised(
    name: str, run: Callable[[], Awaitable[None]], **log_context: Any
) -> asyncio.Task[None]:
    """:func:`supervised` as a task of its own, with its own log context."""
    context = contextvars.Context()

    async def bound() -> None:
        with structlog.contextvars.bound_contextvars(**log_context):
            await supervised(name, run)

    return asyncio.create_task(bound(), name=name, context=context)
