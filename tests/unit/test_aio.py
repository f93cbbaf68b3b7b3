import asyncio
import contextlib
import time

import pytest

from deployster.aio import RECANCEL_AFTER, cancel_and_wait


async def test_cancels_and_waits_for_every_task_skipping_none() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def failed() -> None:
        raise RuntimeError("boom")

    running = asyncio.create_task(forever())
    broken = asyncio.create_task(failed())
    await started.wait()
    await asyncio.sleep(0)
    await cancel_and_wait(running, None, broken)
    assert running.cancelled() and broken.done() and not broken.cancelled()


async def test_the_callers_own_cancellation_goes_through() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()  # takes its time to stop
            raise

    child = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    closer = asyncio.create_task(cancel_and_wait(child))
    await asyncio.sleep(0.01)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    release.set()
    await asyncio.wait([child])


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    """As asyncio.wait_for does on Python 3.11 when the cancellation meets its result (aetcd
    waits so for a new watch's confirmation): the task goes on as if never cancelled."""
    wake = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            wake.clear()
            rounds += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=30)

    child = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    wake.set()  # the wait ends, and the cancellation arrives before wait_for resumes
    start = time.monotonic()
    async with asyncio.timeout(5):
        await cancel_and_wait(child)
    assert child.cancelled() and rounds == 2
    assert RECANCEL_AFTER <= time.monotonic() - start < RECANCEL_AFTER + 1
