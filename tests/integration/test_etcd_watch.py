"""The resumable prefix watch (docs/etcd.md §3.1) against a private etcd we can restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import pytest

from deployster.etcd import WatchEvent, client, watch_prefix
from deployster.launchers import EtcdServer
from tests.helpers import eventually

PREFIX = "/w/"


@pytest.fixture
async def etcd(private_etcd: EtcdServer) -> AsyncIterator[aetcd.Client]:
    async with client(private_etcd.endpoint) as c:
        yield c


def restart(private_etcd: EtcdServer, log: Path) -> None:
    private_etcd.stop()
    private_etcd.start(log_path=log)
    private_etcd.wait_ready()


class Recorder:
    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self.resyncs: list[tuple[dict[str, str], int]] = []

    async def on_event(self, event: WatchEvent) -> None:
        self.events.append(event)

    async def on_resync(self, snapshot: dict[str, str], revision: int) -> None:
        self.resyncs.append((snapshot, revision))

    def start(self, etcd: aetcd.Client, start_revision: int | None = None) -> asyncio.Task[None]:
        return asyncio.create_task(
            watch_prefix(etcd, PREFIX, self.on_event, self.on_resync, start_revision)
        )


async def stop(task: asyncio.Task[None]) -> float:
    """Cancel the watch; return how long it took to end."""
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    return time.monotonic() - began


async def test_live_events_in_order_without_loss_or_duplicates(etcd: aetcd.Client) -> None:
    await etcd.put(b"/w/before", b"0")
    await etcd.put(b"/other/x", b"not watched")
    rec = Recorder()
    task = rec.start(etcd)
    await eventually(lambda: _true(rec.resyncs))
    snapshot, revision = rec.resyncs[0]
    assert snapshot == {"/w/before": "0"}

    revisions = []
    for i in range(20):
        revisions.append((await etcd.put(f"/w/k{i}".encode(), str(i).encode())).header.revision)
    await etcd.put(b"/other/y", b"ignored")
    await etcd.delete(b"/w/k3")
    await eventually(lambda: _true(len(rec.events) >= 21))
    await stop(task)

    assert [e.key for e in rec.events[:20]] == [f"/w/k{i}" for i in range(20)]
    assert [e.revision for e in rec.events[:20]] == revisions
    assert all(e.kind == "put" and e.value == str(i) for i, e in enumerate(rec.events[:20]))
    assert rec.events[20] == WatchEvent("delete", "/w/k3", None, revisions[-1] + 2)
    assert len(rec.events) == 21
    assert all(e.revision > revision for e in rec.events)
    assert len(rec.resyncs) == 1


async def test_watch_from_a_past_revision_replays_history(etcd: aetcd.Client) -> None:
    first = (await etcd.put(b"/w/a", b"1")).header.revision
    await etcd.put(b"/w/a", b"2")
    await etcd.delete(b"/w/a")
    rec = Recorder()
    task = rec.start(etcd, start_revision=first)
    await eventually(lambda: _true(len(rec.events) >= 3))
    await etcd.put(b"/w/b", b"live")
    await eventually(lambda: _true(len(rec.events) >= 4))
    await stop(task)
    assert rec.events == [
        WatchEvent("put", "/w/a", "1", first),
        WatchEvent("put", "/w/a", "2", first + 1),
        WatchEvent("delete", "/w/a", None, first + 2),
        WatchEvent("put", "/w/b", "live", first + 3),
    ]
    assert rec.resyncs == []  # a start revision means no initial resync


async def test_puts_across_an_etcd_restart_arrive_exactly_once(
    private_etcd: EtcdServer, etcd: aetcd.Client, tmp_path: Path, log_lines: list[dict[str, object]]
) -> None:
    rec = Recorder()
    task = rec.start(etcd)
    await eventually(lambda: _true(rec.resyncs))
    for i in range(5):
        await etcd.put(f"/w/k{i}".encode(), b"x")
    await eventually(lambda: _true(len(rec.events) == 5))
    await asyncio.to_thread(restart, private_etcd, tmp_path / "etcd.log")
    # The client reconnects by itself; the puts retry until etcd takes them.
    for i in range(5, 10):
        await eventually(lambda i=i: _put(etcd, f"/w/k{i}"), timeout=15)
    await eventually(lambda: _true(len(rec.events) >= 10), timeout=15)
    await stop(task)
    assert [e.key for e in rec.events] == [f"/w/k{i}" for i in range(10)]
    assert len({e.revision for e in rec.events}) == 10
    assert any(line["event"] == "etcd_watch_reconnecting" for line in log_lines)
    assert len(rec.resyncs) == 1  # a reconnect resumes; it does not resync


async def test_catch_up_killed_midway_resumes_from_event_revision(
    private_etcd: EtcdServer, etcd: aetcd.Client, tmp_path: Path, log_lines: list[dict[str, object]]
) -> None:
    """1500 events of catch-up: etcd stamps each batch with the *current* revision, so a
    resume from the header revision would skip most of them (docs/etcd.md §3.1)."""
    count = 1500
    value = b"v" * 1024  # big enough that the catch-up comes in several responses
    first = None
    for i in range(count):
        revision = (await etcd.put(f"/w/{i:05d}".encode(), value)).header.revision
        first = first or revision
    seen_at_kill: list[int] = []

    async def on_event(event: WatchEvent) -> None:
        rec.events.append(event)
        if len(rec.events) == 1:
            # Kill etcd while the catch-up is in flight, and bring it back.
            seen_at_kill.append(len(rec.events))
            assert private_etcd.process is not None
            private_etcd.process.kill()
            private_etcd.process.wait()
            private_etcd.start(log_path=tmp_path / "etcd.log")
            await asyncio.to_thread(private_etcd.wait_ready)

    rec = Recorder()
    task = asyncio.create_task(watch_prefix(etcd, PREFIX, on_event, rec.on_resync, first))
    await eventually(lambda: _true(len(rec.events) >= count), timeout=30)
    await etcd.put(b"/w/live", b"after")
    await eventually(lambda: _true(rec.events[-1].key == "/w/live"), timeout=10)
    await stop(task)

    revisions = [e.revision for e in rec.events]
    assert revisions == list(range(first, first + count + 1))  # all, once, in order
    reconnects = [line for line in log_lines if line["event"] == "etcd_watch_reconnecting"]
    assert reconnects, "etcd was killed but the watch never reconnected"
    # The resume point was an event's revision inside the catch-up, not the header revision.
    assert first < reconnects[0]["revision"] < first + count  # type: ignore[operator]


async def test_watch_from_a_compacted_revision_resyncs(
    etcd: aetcd.Client, log_lines: list[dict[str, object]]
) -> None:
    old = (await etcd.put(b"/w/gone", b"1")).header.revision
    await etcd.put(b"/w/kept", b"1")
    await etcd.put(b"/w/kept", b"2")
    await etcd.delete(b"/w/gone")
    await etcd.put(b"/w/new", b"3")
    latest = (await etcd.put(b"/other/x", b"y")).header.revision
    await etcd.compact(latest)

    rec = Recorder()
    task = rec.start(etcd, start_revision=old)
    await eventually(lambda: _true(rec.resyncs))
    assert rec.resyncs[0] == ({"/w/kept": "2", "/w/new": "3"}, latest)
    assert rec.events == []
    # And it goes on watching from the snapshot.
    revision = (await etcd.put(b"/w/after", b"4")).header.revision
    await eventually(lambda: _true(rec.events))
    await stop(task)
    assert rec.events == [WatchEvent("put", "/w/after", "4", revision)]
    assert any(line["event"] == "etcd_watch_resynced" for line in log_lines)


async def test_cancellation_stops_the_watch_promptly_and_frees_it(etcd: aetcd.Client) -> None:
    rec = Recorder()
    task = rec.start(etcd)
    await eventually(lambda: _true(rec.resyncs))
    assert await stop(task) < 0.5
    await etcd.put(b"/w/after-cancel", b"x")
    await asyncio.sleep(0.2)  # time for a stray event to show up, if one would
    assert rec.events == []
    assert etcd._watcher._callbacks == {}  # the aetcd watch was cancelled too


async def test_cancellation_while_etcd_is_down_is_prompt(
    private_etcd: EtcdServer, etcd: aetcd.Client
) -> None:
    rec = Recorder()
    task = rec.start(etcd)
    await eventually(lambda: _true(rec.resyncs))
    await asyncio.to_thread(private_etcd.stop)
    await asyncio.sleep(0.5)  # the watch is now backing off between reconnects
    assert await stop(task) < 0.5


async def _true(value: object) -> bool:
    return bool(value)


async def _put(etcd: aetcd.Client, key: str) -> bool:
    try:
        await etcd.put(key.encode(), b"x")
    except aetcd.ClientError:
        return False
    return True
