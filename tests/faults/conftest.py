"""Fault fixtures: an etcd, a localfleet and a Traefik of the tier's own, so that a test may
pause (SIGSTOP/SIGCONT) them, kill them with SIGKILL and start them again on the same ports,
or cut the router's own path to etcd, mid-deploy; and a Deployster app through that Traefik.

Every test here ends with the checks of :func:`assert_settled`, and no supervised task of the
in-process server may crash during it (``no_task_crashed``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import LogTail, eventually, wait_http
from integration.conftest import FAST_POLICY, Api, running_api
from integration.traefik import THROTTLE, Traefik

from deployster import etcd
from deployster.launchers import EtcdServer, free_port, traefik_command
from deployster.routers import TraefikRouter
from handlers.deploys import LOCK_TTL

ENDED = ("succeeded", "failed", "rolled_back")


@dataclass
class Paused:
    """A child process that a test can freeze: requests to it hang as on a dead network."""

    process: subprocess.Popen[bytes]

    @contextlib.asynccontextmanager
    async def paused(self, seconds: float) -> AsyncIterator[None]:
        """Frozen for ``seconds`` (the body runs at the start of the pause)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
            await asyncio.sleep(seconds)
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@dataclass
class Child(Paused):
    """A child process that a test can also kill with SIGKILL and start again, with the same
    command line (the same ports, the same state directory)."""

    command: list[str] = field(default_factory=list)
    ready_url: str = ""
    log: Path = Path()

    @classmethod
    def start(cls, command: list[str], ready_url: str, log: Path) -> Child:
        child = cls(cls._spawn(command, log), command, ready_url, log)
        child._wait_ready()
        return child

    @staticmethod
    def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(command, stdout=out, stderr=out)

    def _wait_ready(self) -> None:
        wait_http(self.ready_url, self.process, self.log)

    def kill(self) -> None:
        """SIGKILL: nothing of it runs its shutdown (a localfleet's units live on)."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    async def restart(self) -> None:
        """Start it again and wait until it answers."""
        assert self.process.poll() is not None, "kill it first"
        self.process = self._spawn(self.command, self.log)
        await asyncio.to_thread(self._wait_ready)

    @contextlib.asynccontextmanager
    async def killed(self, seconds: float) -> AsyncIterator[None]:
        """Dead for ``seconds`` (the body runs right after the kill), then running again."""
        self.kill()
        try:
            yield
            await asyncio.sleep(seconds)
        finally:
            await self.restart()

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGCONT)  # a paused one must be able to stop
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The etcd, localfleet and Traefik are shared by the tests of the tier: every test deploys
# a service of its own, and a test that pauses or kills one of them lets it run again before
# it ends (``Paused.paused``, ``Child.killed``).


@pytest.fixture(scope="session")
def fault_etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd of the fault tests alone, which they may pause."""
    data = tmp_path_factory.mktemp("fault-etcd")
    server = EtcdServer(data / "data")
    server.start(log_path=data / "etcd.log")
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def fault_etcd(fault_etcd_server: EtcdServer) -> Paused:
    assert fault_etcd_server.process is not None
    return Paused(fault_etcd_server.process)


@pytest.fixture(scope="session")
def fault_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Child]]:
    """localfleet with two machines and a state directory (which a restart reads)."""
    state = tmp_path_factory.mktemp("fault-fleet")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "deployster", "localfleet", "--listen", f"127.0.0.1:{port}"]
    command += ["--machines", "2", "--state-dir", str(state / "state")]
    child = Child.start(command, f"{endpoint}/fleet/v1/machines", state / "localfleet.log")
    try:
        yield endpoint, child
    finally:
        child.stop()


@pytest.fixture(scope="session")
def fault_router(
    fault_etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Traefik, Child]]:
    """Traefik watching the fault tests' etcd, on ports it keeps across a restart."""
    web, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("fault-traefik") / "traefik.log"
    command = traefik_command(fault_etcd_server.endpoint, "traefik", web, api, throttle=THROTTLE)
    child = Child.start(command, f"http://{api}/api/version", log)
    try:
        yield Traefik(f"http://{web}", f"http://{api}", "traefik", log), child
    finally:
        child.stop()


@pytest.fixture
def fault_traefik(fault_router: tuple[Traefik, Child]) -> Traefik:
    return fault_router[0]


@pytest.fixture
async def fault_api(
    aiohttp_client,  # type: ignore[no-untyped-def]
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Child],
    fault_traefik: Traefik,
) -> AsyncIterator[Api]:
    """Deployster on the fault tests' etcd and localfleet, routing through their Traefik."""
    async with running_api(
        aiohttp_client,
        fault_etcd_server.endpoint,
        fault_fleet[0],
        router="traefik",
        traefik_root=fault_traefik.root_key,
        traefik_api=fault_traefik.api_url,
    ) as api:
        await api.deployster.store.save_policy(
            api.service, FAST_POLICY.model_copy(update={"drain": 0.5})
        )
        yield api


@pytest.fixture(autouse=True)
def no_task_crashed(server_log: Path) -> Iterator[None]:
    """No supervised task of the in-process servers crashed during the test: a fault is met
    by retrying, never by a task that dies (and is started again by its supervisor)."""
    tail = LogTail(server_log)
    yield
    crashed = [line for line in tail.text().splitlines() if '"task_crashed"' in line]
    assert crashed == [], crashed


# -- what every fault test checks at its end --------------------------------------------


def workloads(service: str) -> dict[int, str]:
    """The live (non-zombie) processes of the test workload that run units of ``service``:
    pid -> unit, read from /proc (each unit passes its name in the environment)."""
    found = {}
    wanted = f"DEPLOYSTER_SERVICE={service}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted not in environ or stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X"):
            continue
        for item in environ:
            if item.startswith(b"DEPLOYSTER_UNIT="):
                found[int(proc.name)] = item.split(b"=", 1)[1].decode()
    return found


async def assert_settled(api: Api, done: dict[str, Any], serving: list[str]) -> None:
    """The deploy ended and its lock is free; fleet lists exactly ``serving`` and exactly one
    workload process runs for each of them: no orphan, no copy."""
    assert done["state"] in ENDED and done["step"] == "done", done

    async def unlocked() -> bool:
        return await api.deployster.store.locks.holder(api.service) is None

    # Released by the worker's pass that finished the deploy (or its retry); at the latest,
    # a lock etcd would not delete then expires with its lease, no longer kept alive.
    await eventually(unlocked, timeout=LOCK_TTL + 2, interval=0.1)
    assert sorted(await api.units()) == sorted(serving)

    async def one_process_each() -> bool:
        return sorted(workloads(api.service).values()) == sorted(serving)

    try:
        await eventually(one_process_each, timeout=15, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"workload processes {workloads(api.service)}, units {serving}"
        ) from None


class EtcdGate:
    """A TCP path to etcd that a test can block: requests over it hang as over a dead link
    (until the client's deadline), while every other client reaches etcd as usual. Blocked
    bytes are held, and delivered once the gate opens, as a slow network would."""

    def __init__(self, etcd_endpoint: str) -> None:
        host, port = etcd_endpoint.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None
        self.streams: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        self.open.set()
        for stream in self.streams:
            stream.close()
        await self.server.wait_closed()

    @contextlib.asynccontextmanager
    async def blocked(self) -> AsyncIterator[None]:
        """Blocked while the body runs."""
        self.open.clear()
        try:
            yield
        finally:
            self.open.set()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.streams.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self.streams.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.open.wait()
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


@pytest.fixture
async def router_gate(fault_api: Api, fault_etcd_server: EtcdServer) -> AsyncIterator[EtcdGate]:
    """The router of ``fault_api`` reaches etcd over a gate of its own: blocking it fails the
    router's reads and writes alone (a ``RouterError``), while the store, the locks and the
    instances' watch go on."""
    gate = EtcdGate(fault_etcd_server.endpoint)
    await gate.start()
    router = fault_api.deployster.router
    assert isinstance(router, TraefikRouter)
    try:
        # A shorter request deadline than the server's (5 s): the test waits less for it.
        async with etcd.client(gate.endpoint, timeout=2) as gated:
            kept, router.etcd = router.etcd, gated
            try:
                yield gate
            finally:
                router.etcd = kept
    finally:
        await gate.close()
