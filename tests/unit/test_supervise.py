"""Supervised tasks: a crash is logged with the task's context and the task starts again."""

from __future__ import annotations

import asyncio

from deployster.aio import cancel_and_wait
from deployster.supervise import start_supervised


async def test_a_crashing_task_is_logged_and_restarted(log_lines: list[dict]) -> None:
    runs = 0
    third = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            third.set()
            await asyncio.sleep(3600)
        raise ValueError("bad")

    task = start_supervised("flaky", flaky, service="web")
    await asyncio.wait_for(third.wait(), 5)  # restarted twice: 0.2 s, then 0.4 s backoff
    crashes = [line for line in log_lines if line["event"] == "task_crashed"]
    assert len(crashes) == 2
    assert crashes[0]["task"] == "flaky" and crashes[0]["service"] == "web"
    assert crashes[1]["restart_in"] == 2 * crashes[0]["restart_in"]
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_a_loop_that_returns_is_restarted_too(log_lines: list[dict]) -> None:
    runs = asyncio.Queue[int]()

    async def returns() -> None:
        runs.put_nowait(1)

    task = start_supervised("returns", returns)
    for _ in range(2):
        await asyncio.wait_for(runs.get(), 5)
    await cancel_and_wait(task)
    assert any(line["event"] == "task_ended" for line in log_lines)
