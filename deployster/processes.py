"""The processes ``deployster up`` runs, supervised as an init system supervises services.

A part that exits or is killed is logged with its exit status and its log file, and started
again after a delay that doubles from ``INITIAL_DELAY`` up to ``MAX_DELAY`` while it keeps
dying soon after its start, and falls back to ``INITIAL_DELAY`` once it has run for
``STABLE_AFTER`` seconds. A part is started again only while the parts it ``needs`` run (the
server waits for etcd and localfleet); the others keep running while one restarts, and
reconnect by themselves. Nothing here blocks: a restart that is due waits for the next
``check``, so a stop is never held up by one.

In-process asyncio tasks are supervised elsewhere; this module is about child processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INITIAL_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 10.0
CHECK_INTERVAL = 0.2


def exit_status(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``, as Popen's returncode says."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, ``timeout`` seconds to finish, then SIGKILL to its whole process group."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class Part:
    """One supervised process: how to start it, where it logs, how long it may take to stop."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    log: Path
    stop_timeout: float
    needs: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = 0.0  # the last restart delay; 0 until the first restart
    restart_at: float | None = None  # set while the part is down

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Parts in dependency order: started in it, stopped in reverse."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.parts: list[Part] = []
        self._say = say

    def start(self, part: Part) -> subprocess.Popen[bytes]:
        """Start a part for the first time; it is supervised from now on."""
        self.parts.append(part)
        part.process = part.start()
        part.started_at = time.monotonic()
        return part.process

    def check(self, now: float | None = None) -> None:
        """Notice parts that died, and start again those whose delay is over."""
        now = time.monotonic() if now is None else now
        running = {part.name for part in self.parts if part.running}
        for part in self.parts:
            if part.name in running:
                continue
            if part.restart_at is None:
                self._schedule(part, now)
            elif now >= part.restart_at and all(need in running for need in part.needs):
                self._restart(part, now)
                if part.running:
                    running.add(part.name)

    def _schedule(self, part: Part, now: float) -> None:
        assert part.process is not None
        ran = now - part.started_at
        part.delay = (
            INITIAL_DELAY
            if ran >= STABLE_AFTER or not part.delay
            else min(part.delay * 2, MAX_DELAY)
        )
        part.restart_at = now + part.delay
        self._say(
            f"{part.name} (pid {part.process.pid}) {exit_status(part.process.returncode)} "
            f"after {ran:.1f} s; restarting it in {part.delay:.1f} s; see {part.log}"
        )

    def _restart(self, part: Part, now: float) -> None:
        part.restart_at = None
        part.started_at = now
        try:
            part.process = part.start()
        except OSError as exc:
            # As if it had exited at once: the next check schedules a longer delay.
            part.delay = min(max(part.delay, INITIAL_DELAY) * 2, MAX_DELAY)
            part.restart_at = now + part.delay
            self._say(f"{part.name} could not be started ({exc}); retrying in {part.delay:.1f} s")
            return
        self._say(f"{part.name} restarted (pid {part.process.pid})")

    def run(self, stopping: Callable[[], bool]) -> None:
        """Supervise until ``stopping()`` says so."""
        while not stopping():
            self.check()
            time.sleep(CHECK_INTERVAL)

    def stop(self) -> None:
        """Stop every part in reverse order, each with its own time to finish."""
        for part in reversed(self.parts):
            if part.process is not None:
                stop_process(part.process, part.stop_timeout)
