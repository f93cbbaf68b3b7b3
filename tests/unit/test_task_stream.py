"""The task stream's bytes: Go durations, the original's trailers, the output tail and the
fan-out of one task's output to its followers."""

from __future__ import annotations

import asyncio

import pytest

from deployster.records import TaskRecord, TaskState
from handlers.tasks import OutputTail, TaskRun, _Follower, go_duration, trailer


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (600, "10m0s"),
        (2, "2s"),
        (90, "1m30s"),
        (3600, "1h0m0s"),
        (3725, "1h2m5s"),
        (1.5, "1.5s"),
        (0.5, "500ms"),
        (61.25, "1m1.25s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def record(**fields: object) -> TaskRecord:
    base: dict[str, object] = {
        "id": "t1",
        "service": "svc",
        "version": "v1",
        "image": "p/svc:v1",
        "command": ["true"],
        "timeout": 600.0,
    }
    return TaskRecord.model_validate(base | fields)


def test_trailers_are_the_originals_bytes() -> None:
    assert trailer(record(state=TaskState.SUCCEEDED, exit_code=0)) == b"\nExited (0) \n"
    assert trailer(record(state=TaskState.FAILED, exit_code=127, error="Something went wrong")) == (
        b"\nExited (127) Something went wrong\n"
    )
    assert trailer(record(state=TaskState.TIMED_OUT, exit_code=124)) == (
        b"\nExited (124) The task timed out after 10m0s. Forcefully removing container.\n"
    )
    assert trailer(record(state=TaskState.TIMED_OUT, exit_code=124, timeout=2.0)) == (
        b"\nExited (124) The task timed out after 2s. Forcefully removing container.\n"
    )
    assert trailer(
        record(state=TaskState.ERROR, error="Docker failed while the task ran: boom")
    ) == (b"ERROR: Docker failed while the task ran: boom\n")
    assert trailer(record(state=TaskState.FAILED, exit_code=3, cleanup_error="busy")) == (
        b"\nExited (3) \nWARNING: Container could not be cleaned up (busy)\n"
    )


def test_output_tail_keeps_the_end_and_whole_characters() -> None:
    tail = OutputTail(8)
    tail.append(b"abc")
    assert (tail.text(), tail.truncated) == ("abc", False)
    tail.append("xyz\u00fc1234".encode())  # the u-umlaut is two bytes
    assert (tail.text(), tail.truncated) == ("yz\u00fc1234", True)
    tail.append(b"567")  # the cut now splits the u-umlaut: its second byte is skipped
    assert bytes(tail.data) == b"\xbc1234567"
    assert tail.text() == "1234567"


async def collect(run: TaskRun) -> bytes:
    return b"".join([chunk async for chunk in run.follow()])


async def test_followers_get_backlog_live_output_and_trailer() -> None:
    run = TaskRun(record(), tail_limit=1024)
    run.publish(b"early\n")
    first = asyncio.create_task(collect(run))
    await asyncio.sleep(0)
    run.publish(b"live\n")
    second = asyncio.create_task(collect(run))
    await asyncio.sleep(0)
    run.publish(b"more\n")
    run.finish(b"\nExited (0) \n")
    assert await first == b"early\nlive\nmore\n\nExited (0) \n"
    assert await second == b"early\nlive\nmore\n\nExited (0) \n"
    # A follower that comes after the end gets the tail and the trailer at once.
    assert await collect(run) == b"early\nlive\nmore\n\nExited (0) \n"


async def test_a_follower_that_falls_too_far_behind_is_cut_off_with_a_sentence() -> None:
    follower = _Follower()
    chunk = b"x" * (1024 * 1024)
    for _ in range(9):
        follower.push(chunk)
    received = [c async for c in follower.chunks("/v1/services/svc/tasks/t1")]
    assert len(received) == 1
    assert received[0].startswith(b"\nERROR: this client read the output too slowly")
    assert b"GET /v1/services/svc/tasks/t1?follow=1" in received[0]


async def test_a_stopping_server_ends_followers_without_a_trailer() -> None:
    run = TaskRun(record(), tail_limit=1024)
    follower = asyncio.create_task(collect(run))
    await asyncio.sleep(0)
    run.publish(b"partial")
    run.finish(b"")
    assert await follower == b"partial"
