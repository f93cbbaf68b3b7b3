import asyncio

import pytest

from deployster.aio import cancel_and_wait


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
