"""Load through a router: clients that keep requesting one service until stopped.

The zero-downtime tests, the fault tests, the ``deployster up`` tests and the benchmarks
all ask the same question: while something changes behind the router (a deploy, a paused
etcd, a killed part), does every request still get an answer, and how fast? ``Load`` runs
``clients`` concurrent clients, each sending ``GET url`` with the service's ``Host`` header
one request after the other, and records every answer as a :class:`Result`: when it ended,
the phase the caller had set when it was sent, its latency, and either the version that
answered or why it failed. A 200 is an answer; anything else (another status, a refused
connection, a timeout) is a failure.

The version is the ``version`` field of the test workload's JSON identity, or the body
itself for a service that answers plain text (a container serving its version as a file).

Async callers run it around the work (``async with load.running(clients=6):``), or as a
task they stop; synchronous ones run the same clients on a thread of their own
(``with load.in_thread(clients=1):``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import aiohttp

# After a failed request a client waits this long before the next one, so that a refused
# port is not hammered in a hot loop.
FAILURE_PAUSE = 0.01


@dataclass(frozen=True)
class Result:
    """One request: ``at`` is when it ended (monotonic seconds)."""

    at: float
    phase: str
    latency: float  # seconds
    version: str | None = None  # who answered a 200
    failure: str | None = None  # why it did not get a 200

    @property
    def ok(self) -> bool:
        return self.failure is None


def version_of(body: bytes) -> str:
    """The workload's ``version`` from its JSON identity, else the body's text."""
    text = body.decode(errors="replace").strip()
    with contextlib.suppress(ValueError):
        found = json.loads(text)
        version = found.get("version") if isinstance(found, dict) else None
        if isinstance(version, str):
            return version
    return text[:80]


class Load:
    """Clients requesting ``url`` with ``Host: host`` until stopped, every answer recorded."""

    def __init__(self, url: str, host: str, *, timeout: float = 10.0, pause: float = 0.0) -> None:
        self.url = url
        self.host = host
        self.timeout = timeout  # per request
        self.pause = pause  # seconds each client waits between two requests
        self.phase = "warmup"  # recorded with each request sent from now on
        self.results: list[Result] = []
        self.clients = 0
        self._stopping = False

    # -- running -----------------------------------------------------------------------

    async def run(self, clients: int) -> None:
        """Run ``clients`` clients until :meth:`stop`; each ends the request it has in flight."""
        self.clients = clients
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=clients),
        ) as session:
            await asyncio.gather(*(self._client(session) for _ in range(clients)))

    def stop(self) -> None:
        self._stopping = True

    @contextlib.asynccontextmanager
    async def running(self, clients: int) -> AsyncIterator[Load]:
        """The clients run while the body does; they are stopped and waited for after it."""
        task = asyncio.create_task(self.run(clients))
        try:
            yield self
        finally:
            self.stop()
            await task

    @contextlib.contextmanager
    def in_thread(self, clients: int) -> Iterator[Load]:
        """:meth:`running` for synchronous callers: the clients on a thread of their own."""
        thread = threading.Thread(target=asyncio.run, args=(self.run(clients),), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join(self.timeout + 5)

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self._stopping:
            if self.pause:
                await asyncio.sleep(self.pause)
            phase, start = self.phase, time.monotonic()
            version = failure = None
            try:
                async with session.get(self.url, headers={"Host": self.host}) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        version = version_of(body)
                    else:
                        failure = f"HTTP {resp.status}: {body[:80].decode(errors='replace')}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                failure = repr(exc)
            end = time.monotonic()
            self.results.append(Result(end, phase, end - start, version, failure))
            if failure is not None:
                await asyncio.sleep(FAILURE_PAUSE)

    # -- what it saw -------------------------------------------------------------------

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failures(self) -> list[str]:
        return [r.failure for r in self.results if r.failure is not None]

    @property
    def versions(self) -> Counter[str]:
        return Counter(r.version for r in self.results if r.version is not None)

    def failed(self, since: float = 0.0) -> tuple[int, int]:
        """(failed, all) requests that ended at or after ``since`` (monotonic seconds)."""
        window = [r.ok for r in self.results if r.at >= since]
        return window.count(False), len(window)

    def summary(self) -> str:
        return f"{self.ok} requests answered, {len(self.failures)} failed, {dict(self.versions)}"

    def report(self, phases: Iterable[str]) -> str:
        """A table of requests, failures and latency percentiles (ms) for each of ``phases``,
        and their total."""
        lines = [f"{'phase':<22}{'requests':>10}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}"]
        total = failed = 0
        for phase in phases:
            results = [r for r in self.results if r.phase == phase]
            latencies = [r.latency for r in results if r.ok]
            p50, p99 = _percentiles(latencies)
            total += len(results)
            failed += len(results) - len(latencies)
            lines.append(
                f"{phase:<22}{len(results):>10}{len(results) - len(latencies):>8}"
                f"{p50:>9.2f}{p99:>9.2f}"
            )
        lines.append(f"total: {total} requests, {failed} failed, {self.clients} clients")
        return "\n".join(lines)


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile in milliseconds (NaN for fewer than two)."""
    if len(latencies) < 2:
        return float("nan"), float("nan")
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49] * 1000, cuts[98] * 1000
