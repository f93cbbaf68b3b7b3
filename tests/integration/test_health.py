"""Probing the real test workload, a closed port and a server that never answers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from deployster.health import (
    ProbeResult,
    probe,
)
from deployster.launchers import free_port
from deployster.policy import HealthPolicy
from tests.helpers import eventually

FAST = HealthPolicy(interval=0.1, timeout=1.0)

StartWorkload = Callable[..., Awaitable[str]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def start_workload(tmp_path: Path) -> AsyncIterator[StartWorkload]:
    """Start ``python -m deployster.testing.workload`` (no etcd); return its URL."""
    children: list[asyncio.subprocess.Process] = []

    async def start(**env: str) -> str:
        log = tmp_path / f"workload-{len(children)}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYSTER_")}
        environ.update(DEPLOYSTER_SERVICE="x", DEPLOYSTER_VERSION="v1", DEPLOYSTER_INSTANCE="1")
        environ.update(env)
        with open(log, "wb") as out:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "deployster.testing.workload",
                stdout=out,
                stderr=out,
                env=environ,
            )
        children.append(child)

        async def listening() -> str | None:
            assert child.returncode is None, log.read_text()
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "workload.listening":
                    return str(json.loads(line)["url"])
            return None

        return await eventually(listening, timeout=15)

    yield start
    for child in children:
        if child.returncode is None:
            child.terminate()
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()


async def test_healthy_workload(
    session: aiohttp.ClientSession, start_workload: StartWorkload
) -> None:
    url = await start_workload()
    result = await probe(session, url, FAST)
    assert result == ProbeResult(ok=True, status=200, detail="HTTP 200", duration=result.duration)
    assert 0 <= result.duration < 1.0


async def test_failing_workload_is_unhealthy_with_http_503(
    session: aiohttp.ClientSession, start_workload: StartWorkload
) -> None:
    url = await start_workload(DEPLOYSTER_WORKLOAD_HEALTH="fail")
    result = await probe(session, url, FAST)
    assert (result.ok, result.status, result.detail) == (False, 503, "HTTP 503")


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    result = await probe(session, f"http://127.0.0.1:{free_port()}", FAST)
    assert (result.ok, result.status, result.detail) == (False, None, "connection refused")


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """Accepts connections, reads, never answers."""
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    release.set()
    server.close()
    await server.wait_closed()


async def test_timeout(session: aiohttp.ClientSession, silent_server: str) -> None:
    check = HealthPolicy(timeout=0.5)
    result = await probe(session, silent_server, check)  # the timeout is what is tested
    assert (result.ok, result.status, result.detail) == (False, None, "timed out after 0.5 s")
    assert 0.5 <= result.duration < 1.0
    default = await probe(session, silent_server, HealthPolicy(timeout=2))
    assert default.detail == "timed out after 2.0 s"
