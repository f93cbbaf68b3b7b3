"""The shared load generator against a local server that answers, refuses, hangs and dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from helpers import eventually

from deployster.testing.load import Load, version_of


@dataclass
class Backend:
    """What the server answers now: ``mode`` is ``json``, ``text``, ``503`` or ``hang``."""

    mode: str = "json"
    hosts: set[str] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        assert self.hosts is not None
        self.hosts.add(request.headers["Host"])
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.mode == "503":
            return web.Response(status=503, text="draining")
        if self.mode == "text":
            return web.Response(text="v2\n")
        return web.json_response({"service": "web", "version": "v1"})


@pytest.fixture
async def served() -> AsyncIterator[tuple[Backend, str, web.AppRunner]]:
    backend = Backend(hosts=set())
    app = web.Application()
    app.router.add_get("/", backend.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield backend, f"http://127.0.0.1:{port}/", runner
    finally:
        await runner.cleanup()


def test_version_of_reads_the_workload_identity_or_the_text() -> None:
    assert version_of(b'{"service": "web", "version": "v7"}') == "v7"
    assert version_of(b"v3\n") == "v3"
    assert version_of(b'{"version": 7}') == '{"version": 7}'  # not a version string
    assert version_of(b"[1, 2]") == "[1, 2]"
    assert version_of(b"\xff\xfe" + b"x" * 200) == ("\ufffd\ufffd" + "x" * 78)


async def test_every_answer_is_counted_by_phase_and_a_dead_server_is_a_failure(
    served: tuple[Backend, str, web.AppRunner],
) -> None:
    backend, url, runner = served
    load = Load(url, "web.localhost", timeout=0.5)
    async with load.running(clients=3):

        async def answered(mode: str, version: str | None) -> bool:
            backend.mode = mode
            mark = len(load.results)
            await asyncio.sleep(0.1)
            return any(r.version == version for r in load.results[mark:])

        load.phase = "json"
        await eventually(lambda: answered("json", "v1"), timeout=5)
        load.phase = "text"
        await eventually(lambda: answered("text", "v2"), timeout=5)
        load.phase = "refused"
        backend.mode = "503"
        await eventually(lambda: _failed_with(load, "HTTP 503: draining"), timeout=5)
        backend.mode = "hang"
        await eventually(lambda: _failed_with(load, "TimeoutError"), timeout=5)
        dead = time.monotonic()
        await runner.cleanup()
        await eventually(lambda: _failed_with(load, "ClientConnectorError"), timeout=5)
    assert backend.hosts == {"web.localhost"}
    assert load.clients == 3 and load.ok > 0
    assert {"v1", "v2"} <= set(load.versions)
    failed, total = load.failed(dead)
    assert failed == total > 0  # nothing answers once the server is gone
    assert all(not r.ok for r in load.results if r.phase == "refused" and r.at >= dead)
    report = load.report(["json", "text", "refused"]).splitlines()
    assert report[0].split() == ["phase", "requests", "failed", "p50", "ms", "p99", "ms"]
    json_row = report[1].split()
    assert json_row[0] == "json" and int(json_row[1]) > 0 and json_row[2] == "0"
    assert float(json_row[3]) < 500
    refused = report[3].split()
    assert refused[0] == "refused" and refused[1] == refused[2]
    assert report[-1].endswith("failed, 3 clients")


async def test_stopping_waits_for_the_requests_in_flight(
    served: tuple[Backend, str, web.AppRunner],
) -> None:
    backend, url, _ = served
    backend.mode = "hang"
    load = Load(url, "web.localhost", timeout=0.3)
    start = time.monotonic()
    async with load.running(clients=2):
        await asyncio.sleep(0.05)
    # Each client ends the request it had in flight (cut at the timeout), then stops.
    assert 0.25 < time.monotonic() - start < 2
    assert load.ok == 0 and len(load.failures) >= 2
    settled = len(load.results)
    await asyncio.sleep(0.4)
    assert len(load.results) == settled


def test_in_thread_serves_synchronous_callers() -> None:
    """A synchronous test runs the clients on a thread; a port nobody listens on fails."""

    async def refused_port() -> int:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return port

    port = asyncio.run(refused_port())
    load = Load(f"http://127.0.0.1:{port}/", "web.localhost", timeout=1)
    with load.in_thread(clients=1):
        deadline = time.monotonic() + 5
        while len(load.results) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert load.failed() == (len(load.results), len(load.results)) and len(load.results) >= 3
    assert all("ClientConnectorError" in f for f in load.failures)


async def _failed_with(load: Load, what: str) -> bool:
    await asyncio.sleep(0.05)
    return any(what in failure for failure in load.failures)
