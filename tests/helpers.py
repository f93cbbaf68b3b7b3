"""Helpers for tests: bounded waits instead of fixed sleeps, process checks, and the suite's
known secrets."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import TypeVar

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
