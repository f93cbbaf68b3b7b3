"""Putting localfleet together: machines, registry, agent and API on one address.

`LocalFleet` is the running whole, for code that embeds it (`deployster up`,
tests): `async with LocalFleet(...) as fleet:` serves until the block ends,
then closes the API and stops every unit cleanly (ExecStop, SIGTERM,
ExecStopPost), as a host shutting down would. `serve` runs one until it is
cancelled; `run` runs one until SIGTERM or SIGINT.

Machine ids are 32 lowercase hex characters derived from the hostname and the
machine's index, so the same host presents the same machines after a restart
and units saved in a state directory find their machine again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import pathlib
import signal
import socket
import stat

import structlog
from aiohttp import web

from deployster.fleet import Machine

from .agent import Agent, AgentContext
from .api import create_app
from .registry import Registry
from .store import RegistryStore, StateFileError

log = structlog.get_logger()

PRIMARY_IP = "127.0.0.1"
MAX_TOKEN_LIMIT = 0xFFFF  # the token stores the limit as a uint16


class StartupError(RuntimeError):
    """localfleet cannot start; the message says why and what to do."""


class InvalidListenAddressError(StartupError):
    """`listen` is neither `unix:PATH` nor `HOST:PORT`, or its socket path is taken."""


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    unix_path: pathlib.Path | None = None
    host: str | None = None
    port: int = 0


def parse_listen(listen: str) -> ListenAddress:
    """`unix:/run/fleet.sock`, `127.0.0.1:49153`, `[::1]:0` or `:49153` (every interface)."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path:
            raise InvalidListenAddressError("unix: needs a socket path, e.g. unix:/tmp/fleet.sock")
        return ListenAddress(unix_path=pathlib.Path(path))
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise InvalidListenAddressError(
            f"cannot listen on {listen!r}: use unix:PATH or HOST:PORT (port 0 picks a free port)"
        )
    return ListenAddress(host=host.strip("[]") or None, port=int(port))


def machine_id(hostname: str, index: int) -> str:
    return hashlib.sha256(f"localfleet\0{hostname}\0{index}".encode()).hexdigest()[:32]


class LocalFleet:
    """A single-machine fleet serving fleet's v1 API."""

    def __init__(
        self,
        listen: str,
        machines: int = 1,
        state_dir: pathlib.Path | None = None,
        token_limit: int = 100,
    ) -> None:
        if machines < 1:
            raise StartupError("localfleet needs at least one machine (--machines 1 or more)")
        if not 1 <= token_limit <= MAX_TOKEN_LIMIT:
            raise StartupError(f"the token limit must be between 1 and {MAX_TOKEN_LIMIT}")
        self._listen = listen
        self._address = parse_listen(listen)
        self._machine_count = machines
        self._state_dir = state_dir
        self._token_limit = token_limit
        self._runner: web.AppRunner | None = None
        self._agent: Agent | None = None
        self._store: RegistryStore | None = None
        self._bound_socket: pathlib.Path | None = None
        self.endpoint = ""

    async def start(self) -> None:
        hostname = socket.gethostname()
        machines = [
            Machine(id=machine_id(hostname, index), primary_ip=PRIMARY_IP)
            for index in range(self._machine_count)
        ]
        self._store = RegistryStore(self._state_dir) if self._state_dir else None
        try:
            self._agent = Agent(
                AgentContext(
                    hostname=hostname,
                    base_environment=dict(os.environ),
                    log_dir=self._state_dir / "logs" if self._state_dir else None,
                    runs=self._store,
                )
            )
        except StateFileError as exc:
            raise StartupError(str(exc)) from exc
        registry = Registry(machines, self._store, on_change=self._agent.apply)
        self._runner = web.AppRunner(
            create_app(registry, self._agent, self._token_limit), access_log=None
        )
        await self._runner.setup()
        try:
            registry.restore()
            self.endpoint = await self._bind(self._runner)
            registry.publish()  # no await since the bind: no request can see the registry half restored
        except StateFileError as exc:
            await self.stop()
            raise StartupError(str(exc)) from exc
        except OSError as exc:
            await self.stop()
            raise StartupError(f"cannot listen on {self._listen}: {exc.strerror or exc}") from exc
        except BaseException:
            await self.stop()
            raise
        log.info(
            "localfleet_listening",
            endpoint=self.endpoint,
            machines=[machine.id for machine in machines],
            state_dir=str(self._state_dir) if self._state_dir else None,
        )

    async def _bind(self, runner: web.AppRunner) -> str:
        address = self._address
        if address.unix_path is not None:
            _remove_stale_socket(address.unix_path)
            await web.UnixSite(runner, str(address.unix_path)).start()
            self._bound_socket = address.unix_path
            return f"unix://{address.unix_path}"
        await web.TCPSite(runner, address.host, address.port).start()
        host, port = runner.addresses[0][:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        """Close the API first, so that nothing changes while every unit stops."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._bound_socket is not None:
            self._bound_socket.unlink(missing_ok=True)
            self._bound_socket = None
        if self._agent is not None:
            log.info("localfleet_stopping_units")
            await self._agent.shutdown()
            self._agent = None
        if self._store is not None:
            self._store.close()
            self._store = None
        log.info("localfleet_stopped")

    async def __aenter__(self) -> LocalFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _remove_stale_socket(path: pathlib.Path) -> None:
    """A socket left by a previous run would make bind fail; a socket something still
    listens on, or anything else at that path, is not ours to delete."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidListenAddressError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left by a run that ended
            return
    raise InvalidListenAddressError(f"{path} is in use: another process listens on it")


async def serve(
    listen: str, machines: int = 1, state_dir: pathlib.Path | None = None, token_limit: int = 100
) -> None:
    """Serve until cancelled; on cancellation every unit is stopped before this returns."""
    async with LocalFleet(listen, machines, state_dir, token_limit):
        await asyncio.Event().wait()


def run(
    listen: str, machines: int = 1, state_dir: pathlib.Path | None = None, token_limit: int = 100
) -> None:
    """Serve until SIGTERM or SIGINT, then stop every unit cleanly and return."""
    asyncio.run(_serve_until_signal(listen, machines, state_dir, token_limit))


async def _serve_until_signal(
    listen: str, machines: int, state_dir: pathlib.Path | None, token_limit: int
) -> None:
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, received.set)
    async with LocalFleet(listen, machines, state_dir, token_limit):
        await received.wait()
        log.info("localfleet_signal_received")
