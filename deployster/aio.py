"""asyncio helpers shared by the parts that own background tasks."""

from __future__ import annotations

import asyncio
from typing import Any

#: Seconds a cancelled task may take to end before it is cancelled again.
RECANCEL_AFTER = 1.0


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (None entries are skipped) and wait until every one has ended.

    Their results and exceptions are dropped. Unlike suppressing ``CancelledError`` around an
    ``await task``, this never swallows a cancellation of the caller itself.

    A task still running :data:`RECANCEL_AFTER` seconds later is cancelled again: on Python
    3.11 ``asyncio.wait_for`` (which aetcd uses, e.g. while etcd confirms a new watch) returns
    its result instead of raising when the cancellation meets that result, and the task runs on.
    """
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    running = set(live)
    while running:
        _, running = await asyncio.wait(running, timeout=RECANCEL_AFTER)
        for task in running:
            task.cancel()
    for task in live:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
