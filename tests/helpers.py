"""Helpers for tests: bounded waits instead of fixed sleeps, process checks, a receiver of
notifications, and the suite's known secrets."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

#: Every secret the suite hands to a server (passwords, webhook secrets, env values). At the end
#: of the session every server log is searched for each of them and the run fails on a find
#: (tests/conftest.py). Tests add the secrets they generate with ``known_secret``.
PASSWORD = "integration-secret"
E2E_PASSWORD = "e2e-secret"
WEBHOOK_SECRET = "suite-webhook-secret"
ENV_SECRET = "suite-env-secret-value"
KNOWN_SECRETS: list[str] = [
    PASSWORD,
    E2E_PASSWORD,
    WEBHOOK_SECRET,
    ENV_SECRET,
]


def known_secret(value: str) -> str:
    """Add ``value`` to the secrets no server log may contain; returns it."""
    KNOWN_SECRETS.append(value)
    return value


def leaked_secrets(paths: list[pathlib.Path], secrets: list[str]) -> list[str]:
    """``file: secret`` for each secret found in each of ``paths``."""
    found = []
    for path in paths:
        text = path.read_text(errors="replace")
        found += [f"{path}: {secret!r}" for secret in secrets if secret in text]
    return found


class LogTail:
    """What was written to a log file since this object was made."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.start = path.stat().st_size

    def text(self) -> str:
        with open(self.path, encoding="utf-8") as log:
            log.seek(self.start)
            return log.read()


class LoggedProcess(subprocess.Popen[str]):
    """A server process whose standard error a test reads with ``communicate()``; what was
    read is also appended to ``log``, where the session's secret check finds it."""

    def __init__(self, args: list[str], log: pathlib.Path, **kwargs: object) -> None:
        super().__init__(args, **kwargs)  # type: ignore[call-overload]
        self.log = log

    def communicate(  # type: ignore[override]
        self, input: str | None = None, timeout: float | None = None
    ) -> tuple[str, str]:
        out, err = super().communicate(input, timeout)
        with open(self.log, "a", encoding="utf-8") as kept:
            kept.write(err or "")
        return out, err


async def eventually(
    probe: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Await ``probe`` until it returns a truthy value; fail with its last result on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s; last value: {last!r}")


def self_signed(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key, made with Debian's openssl
    in ``folder``: ``(cert.pem, key.pem)``."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    argv += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run([*argv, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (read from /proc, Linux only)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def wait_http(
    url: str, child: subprocess.Popen[bytes], log: pathlib.Path, timeout: float = 20.0
) -> None:
    """Wait until ``url`` answers; fail with ``child``'s log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{child.args} exited with {child.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()}")


# A receiver of notifications


@dataclass
class Received:
    event: str
    delivery: str
    signature: str
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """A receiver on a loopback port: records every request; ``answers`` scripts the status
    of the next requests (then 200); ``hang`` holds requests open until released."""

    port: int
    got: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    hang: asyncio.Event | None = None
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.got.append(
                Received(
                    request.headers.get("X-Deployster-Event", ""),
                    request.headers.get("X-Deployster-Delivery", ""),
                    request.headers.get("X-Deployster-Signature-256", ""),
                    await request.read(),
                )
            )
            if self.hang is not None:
                await self.hang.wait()
            return web.Response(status=self.answers.pop(0) if self.answers else 200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def events(self) -> list[str]:
        return [r.event for r in self.got]

    async def received(self, count: int, timeout: float = 10) -> list[Received]:
        async def enough() -> list[Received] | None:
            return self.got if len(self.got) >= count else None

        return await eventually(enough, timeout=timeout)
