"""asyncio helpers shared by the parts that own background tasks."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (None entries are skipped) and wait until every one has ended.

    Their results and exceptions are dropped. Unlike suppressing ``CancelledError`` around an
    ``await task``, this never swallows a cancellation of the caller itself.
    """
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    if live:
        await asyncio.wait(live)
    for task in live:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
