"""The test workload: a small HTTP service that stands in for a deployed container.

Integration tests, benchmarks and the demo need something to deploy that behaves like a
real service, on machines without Docker. The ``workload`` unit template runs this module
(``python -m deployster.testing.workload``) where the ``docker`` template runs a container,
and it keeps the same contract with Deployster as the docker unit:

* it binds a free port (port 0), then announces itself in etcd under
  ``DEPLOYSTER_ANNOUNCE_KEY`` with the JSON the docker unit writes,
  ``{"url": "http://<host>:<port>", "machine": ..., "unit": ...}``;
* ``GET /`` answers its identity, ``GET /health`` its health;
* on SIGTERM or SIGINT it deletes the announcement first, so that routers stop sending
  traffic, then lets in-flight requests finish and exits 0.

Knobs for the tests, all environment variables (the unit passes a deploy's env through):

``DEPLOYSTER_WORKLOAD_HEALTH``
    ``ok`` (default) or ``fail``: ``/health`` then answers 503, while ``/`` still answers,
    which is what a deploy that must roll back looks like.
``DEPLOYSTER_WORKLOAD_STARTUP_DELAY``
    Seconds to wait before binding the port: a slow boot.
``DEPLOYSTER_WORKLOAD_HOST``
    Address to bind, default ``127.0.0.1``. With a wildcard address the announced host is
    ``COREOS_PRIVATE_IPV4`` or ``127.0.0.1``, as in the docker unit.

``GET /slow?seconds=S`` sends its headers at once and its body after ``S`` seconds (at
most 60): a request that is reliably in flight while a test stops the instance.

Without ``DEPLOYSTER_ETCD`` the workload serves without announcing (handy by hand).
Invalid settings exit with status 2 and a sentence on stderr; an announcement that etcd
does not take within 30 s exits with status 1, so that the unit fails.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import sys
from typing import Literal, TextIO

import aetcd
import structlog
from aiohttp import web
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployster import etcd, logs
from deployster.units import Announcement

ANNOUNCE_TIMEOUT = 30.0
ANNOUNCE_RETRY_INTERVAL = 0.2
WITHDRAW_TIMEOUT = 3.0
# Below the workload unit's TimeoutStopSec=10, leaving room for the withdrawal.
SHUTDOWN_TIMEOUT = 6.0
MAX_SLOW_SECONDS = 60.0

log = structlog.get_logger("deployster.workload")


class WorkloadSettings(BaseSettings):
    """What the unit tells the workload, from ``DEPLOYSTER_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="DEPLOYSTER_", extra="ignore", env_ignore_empty=True, frozen=True
    )

    service: str = "workload"
    version: str = "dev"
    instance: int = Field(default=1, ge=1)
    unit: str = ""
    machine: str = Field(default_factory=socket.gethostname)
    etcd: str | None = None
    announce_key: str | None = None
    workload_health: Literal["ok", "fail"] = "ok"
    workload_startup_delay: float = Field(default=0.0, ge=0.0)
    workload_host: str = "127.0.0.1"

    @field_validator("etcd")
    @classmethod
    def _endpoints(cls, value: str | None) -> str | None:
        if value is not None:
            etcd.Endpoint.parse(value)
        return value

    @model_validator(mode="after")
    def _key_with_etcd(self) -> WorkloadSettings:
        if self.etcd is not None and not self.announce_key:
            raise ValueError(
                "DEPLOYSTER_ETCD is set but DEPLOYSTER_ANNOUNCE_KEY is not: "
                "set both to announce, or neither"
            )
        return self

    def identity(self) -> dict[str, str | int]:
        return {
            "service": self.service,
            "version": self.version,
            "instance": self.instance,
            "unit": self.unit,
        }


class Journal:
    """Standard error that outlives its reader. localfleet reads a unit's output through a
    pipe; killed and started again, it adopts the unit's process, but the pipe's reader is
    gone, and a write would raise BrokenPipeError: a workload that logs after that (one still
    booting, or one being stopped) would die of it. Its lines are dropped instead."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            self._lost()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self._lost()

    def isatty(self) -> bool:
        return False

    def _lost(self) -> None:
        self.stream = open(os.devnull, "w")  # noqa: SIM115  (for the rest of the process)
        sys.stderr = self.stream  # nor does Python's own last flush at exit fail


class AnnounceError(RuntimeError):
    """etcd did not take the announcement in time."""


def settings_error(error: ValidationError) -> str:
    """One sentence per invalid setting, naming the environment variable."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ").rstrip(".")
        if item["loc"]:
            name = f"DEPLOYSTER_{str(item['loc'][0]).upper()}"
            lines.append(f"workload: {name}={item['input']!r} is not valid: {message}.")
        else:
            lines.append(f"workload: {message}.")
    return "\n".join(lines)


def build_app(settings: WorkloadSettings) -> web.Application:
    identity = settings.identity()
    healthy = settings.workload_health == "ok"

    async def root(request: web.Request) -> web.Response:
        return web.json_response(identity)

    async def health(request: web.Request) -> web.Response:
        if healthy:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "fail"}, status=503)

    async def slow(request: web.Request) -> web.StreamResponse:
        try:
            seconds = float(request.query.get("seconds", "1"))
        except ValueError:
            seconds = -1.0
        if not 0.0 <= seconds <= MAX_SLOW_SECONDS:
            return web.json_response(
                {"error": f"seconds must be a number from 0 to {MAX_SLOW_SECONDS:g}"},
                status=400,
            )
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await asyncio.sleep(seconds)
        await response.write(json.dumps(identity).encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", root)
    app.router.add_get("/health", health)
    app.router.add_get("/slow", slow)
    return app


def bind_socket(host: str) -> socket.socket:
    """A socket bound to a free port on ``host``; the server listens on it."""
    family, type_, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def announced_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        # Bound on every interface: announce what the docker unit would.
        host = os.environ.get("COREOS_PRIVATE_IPV4") or "127.0.0.1"
        address = ipaddress.ip_address(host)
    return f"http://[{host}]:{port}" if address.version == 6 else f"http://{host}:{port}"


async def serve(settings: WorkloadSettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, announced in etcd while serving if configured."""
    bound = log.bind(service=settings.service, unit=settings.unit)
    if settings.workload_startup_delay:
        bound.info("workload.starting", delay=settings.workload_startup_delay)
        try:
            await asyncio.wait_for(stop.wait(), settings.workload_startup_delay)
            return  # stopped while still booting: nothing to withdraw
        except TimeoutError:
            pass
    sock = bind_socket(settings.workload_host)
    url = announced_url(sock)
    runner = web.AppRunner(build_app(settings), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        bound.info("workload.listening", url=url)
        if settings.etcd is None or settings.announce_key is None:
            await stop.wait()
        else:
            key = settings.announce_key.encode()
            value = Announcement(
                url=url, machine=settings.machine, unit=settings.unit
            ).model_dump_json()
            async with etcd.client(settings.etcd) as client:
                if await _announce(client, key, value.encode(), stop):
                    bound.info("workload.announced", key=settings.announce_key, url=url)
                try:
                    await stop.wait()
                finally:
                    await _withdraw(client, settings.etcd, key, value.encode())
                    bound.info("workload.withdrawn", key=settings.announce_key)
    finally:
        # Stops listening, then waits (bounded) for in-flight requests.
        await runner.cleanup()
        bound.info("workload.stopped")


async def _announce(client: aetcd.Client, key: bytes, value: bytes, stop: asyncio.Event) -> bool:
    """Put the announcement, retrying while etcd is unreachable; False if stopped first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ANNOUNCE_TIMEOUT
    while True:
        try:
            await client.put(key, value)
            return True
        except Exception as error:  # aetcd raises several unrelated types for "unreachable"
            if loop.time() >= deadline:
                raise AnnounceError(
                    f"etcd did not take the announcement within {ANNOUNCE_TIMEOUT:g} s: {error}"
                ) from error
            log.warning("workload.announce_retry", error=str(error))
        if stop.is_set():
            return False
        await asyncio.sleep(ANNOUNCE_RETRY_INTERVAL)


async def _withdraw(client: aetcd.Client, endpoints: str, key: bytes, value: bytes) -> None:
    """Delete the announcement if it is still this process's own (compare-and-delete on the
    exact value, whose URL no other process has): a stale copy of the instance, stopped late,
    never deletes the announcement of the copy that serves now. A second, fresh client if the
    long-lived one fails."""
    try:
        async with asyncio.timeout(WITHDRAW_TIMEOUT):
            await _delete_if_ours(client, key, value)
        return
    except Exception as error:
        log.warning("workload.withdraw_retry", error=str(error))
    try:
        async with asyncio.timeout(WITHDRAW_TIMEOUT):
            async with etcd.client(endpoints) as fresh:
                await _delete_if_ours(fresh, key, value)
    except Exception as error:
        # The instances reconcile removes announcements of units that are gone.
        log.error("workload.withdraw_failed", key=key.decode(), error=str(error))


async def _delete_if_ours(client: aetcd.Client, key: bytes, value: bytes) -> None:
    txn = client.transactions
    deleted, _ = await client.transaction(
        compare=[txn.value(key) == value], success=[txn.delete(key)], failure=[]
    )
    if not deleted:
        log.warning("workload.withdraw_skipped", key=key.decode(), reason="another process's")


async def run(settings: WorkloadSettings) -> None:
    """serve() until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop)


def main() -> int:
    try:
        settings = WorkloadSettings()
    except ValidationError as error:
        print(settings_error(error), file=sys.stderr)
        return 2
    logs.configure(stream=Journal(sys.stderr))  # type: ignore[arg-type]
    try:
        asyncio.run(run(settings))
    except AnnounceError as error:
        print(f"workload: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"workload: cannot listen on {settings.workload_host}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
