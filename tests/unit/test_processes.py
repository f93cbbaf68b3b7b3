"""The supervisor of `deployster up`'s parts: real short-lived processes, time passed in."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployster.processes import MAX_DELAY, Part, Supervisor, exit_status


def spawner(code: str, started: list[int]) -> Part:
    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        started.append(process.pid)
        return process

    return Part("web", start, Path("logs/web.log"), 5.0)


def missing() -> subprocess.Popen[bytes]:
    raise OSError("no such file")


def dies(part: Part) -> None:
    assert part.process is not None
    part.process.wait(10)


def test_a_part_that_keeps_dying_waits_longer_each_time_up_to_the_cap() -> None:
    said: list[str] = []
    started: list[int] = []
    supervisor = Supervisor(said.append)
    part = spawner("raise SystemExit(3)", started)
    supervisor.start(part)
    now = part.started_at
    delays = []
    for _ in range(9):
        dies(part)
        supervisor.check(now + 1)  # died 1 s after its start: not stable
        assert part.restart_at is not None
        delays.append(part.restart_at - (now + 1))
        supervisor.check(part.restart_at - 0.01)  # not yet
        assert part.restart_at is not None
        now = part.restart_at
        supervisor.check(now)
        assert part.restart_at is None and part.started_at == now
    # Times are monotonic clock readings: compared to the millisecond, not bit for bit.
    assert delays == pytest.approx([0.5, 1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY], abs=1e-6)
    assert len(started) == 10 and len(set(started)) == 10
    assert said[0] == (
        f"web (pid {started[0]}) exited with code 3 after 1.0 s; restarting it in 0.5 s; "
        "see logs/web.log"
    )
    assert said[1] == f"web restarted (pid {started[1]})"

    # Once it ran for a while, the next death is met with the shortest delay again.
    dies(part)
    supervisor.check(now + 60)
    assert part.restart_at == pytest.approx(now + 60.5, abs=1e-6)


def test_a_killed_part_says_by_what_and_a_part_waits_for_what_it_needs() -> None:
    said: list[str] = []
    started: list[int] = []
    supervisor = Supervisor(said.append)
    base = spawner("import time; time.sleep(60)", started)
    base.name = "etcd"
    supervisor.start(base)
    server = spawner("import time; time.sleep(60)", started)
    server.needs = ("etcd",)
    supervisor.start(server)
    try:
        assert base.process is not None and server.process is not None
        base.process.kill()
        server.process.kill()
        dies(base)
        dies(server)
        now = base.started_at + 20
        supervisor.check(now)
        assert said[0].startswith(f"etcd (pid {started[0]}) was killed by SIGKILL after ")
        # Both are due; etcd starts, and the server only once etcd runs.
        started.clear()
        base.start = missing
        supervisor.check(now + 0.5)
        assert started == [] and not server.running
        assert said[-1] == "etcd could not be started (no such file); retrying in 1.0 s"
        base.start = spawner("import time; time.sleep(60)", started).start
        supervisor.check(now + 1.5)
        assert base.running and server.running and len(started) == 2
    finally:
        supervisor.stop()
    assert not base.running and not server.running


def test_exit_status_in_words() -> None:
    assert exit_status(0) == "exited with code 0"
    assert exit_status(-9) == "was killed by SIGKILL"
    assert exit_status(-200) == "was killed by signal 200"


def test_a_stop_does_not_wait_for_a_pending_restart() -> None:
    said: list[str] = []
    started: list[int] = []
    supervisor = Supervisor(said.append)
    dead = spawner("raise SystemExit(1)", started)
    supervisor.start(dead)
    alive = spawner("import time; time.sleep(60)", started)
    alive.name = "etcd"
    supervisor.start(alive)
    dies(dead)
    supervisor.check(dead.started_at + 1)
    assert dead.restart_at is not None
    checks = iter([False, True])
    began = time.monotonic()
    supervisor.run(lambda: next(checks))
    supervisor.stop()
    assert time.monotonic() - began < 2
    assert len(started) == 2 and not alive.running
