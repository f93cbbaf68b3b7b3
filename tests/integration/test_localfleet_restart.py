"""localfleet killed with SIGKILL at each moment of a unit's life, then started again on the same
state directory: afterwards exactly the processes it wants run, once, and nothing it left
behind. The moments are held open by the units themselves (a long ExecStartPre, ExecStartPost
or ExecStopPost), and /proc says which processes run before and after.

Every unit's processes carry `TEST_UNIT=<unit>` (and each localfleet's own test marker), so a
copy started by the second localfleet is found as well as what the first one left."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from integration.test_localfleet import (
    FleetClient,
    FleetProcess,
    free_port,
    live_processes,
    options_of,
    wait_for,
)

from deployster.localfleet.store import FILE_NAME


class Restarts:
    """One state directory and port, and the localfleet serving them now."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.tmp_path = tmp_path
        self.state_dir = tmp_path / "state"
        self.port = free_port()
        self.prefix = f"r{uuid.uuid4().hex[:8]}"
        self.fleet = self.start()
        self.session = aiohttp.ClientSession(base_url=self.fleet.url)
        self.client = FleetClient(self.session, self.fleet, self.prefix)

    def start(self) -> FleetProcess:
        return FleetProcess(self.tmp_path, machines=1, state_dir=self.state_dir, port=self.port)

    def kill_9(self) -> None:
        """localfleet alone, as a crash would: its units' processes live on."""
        self.fleet.process.send_signal(signal.SIGKILL)
        self.fleet.process.wait()

    def restart(self) -> None:
        self.fleet = self.start()
        self.client.fleet = self.fleet

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state_dir / FILE_NAME)

    def noted(self) -> dict[str, tuple[str, int]]:
        """unit -> (unit hash, pid) of the runs noted in the registry's database."""
        with self.db() as db:
            rows = db.execute("SELECT unit, unit_hash, pid FROM runs").fetchall()
        return {unit: (unit_hash, pid) for unit, unit_hash, pid in rows}


def processes(name: str) -> dict[int, str]:
    """pid -> command line of every live process of the unit, whichever localfleet started it."""
    found = {}
    for pid in live_processes(TEST_UNIT=name):
        try:
            found[pid] = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
    return {pid: line.decode().strip() for pid, line in found.items()}


@pytest.fixture
async def restarts(tmp_path: pathlib.Path) -> AsyncIterator[Restarts]:
    restarts = Restarts(tmp_path)
    try:
        yield restarts
    finally:
        await restarts.session.close()
        if restarts.fleet.process.poll() is None:
            assert restarts.fleet.stop() == 0, restarts.fleet.log()
        units = [f"{restarts.prefix}-{stem}.service" for stem in ("a", "b", "unit")]
        leftover = {name: processes(name) for name in units if processes(name)}
        for pid in (pid for found in leftover.values() for pid in found):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert leftover == {}, "unit processes outlived localfleet"


def unit_lines(*lines: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Environment", "TEST_UNIT=%n"), *lines]


async def test_killed_after_the_main_process_started_and_before_its_note_it_is_adopted(
    restarts: Restarts,
) -> None:
    """The note comes once the unit runs; a long ExecStartPost holds the main process spawned
    and not noted, as a kill -9 right after the spawn would leave it."""
    client = restarts.client
    name = client.name("unit")
    await client.launch(
        name, unit_lines(("ExecStart", "/bin/sleep 300"), ("ExecStartPost", "/bin/sleep 301"))
    )
    await client.wait_state(name, "activating", "start-post")
    restarts.kill_9()
    before = processes(name)
    assert sorted(before.values()) == ["/bin/sleep 300", "/bin/sleep 301"]
    assert restarts.noted() == {}  # spawned, never noted

    restarts.restart()
    await client.wait_state(name, "active", "running")
    assert processes(name) == before  # the same processes, no copy
    (main,) = [pid for pid, line in before.items() if line == "/bin/sleep 300"]
    assert restarts.noted()[name][1] == main  # noted now, for the next restart
    assert "unit_adopted" in restarts.fleet.log()

    await client.set_state(name, "loaded")  # the adopted run stops whole, its ExecStartPost too
    await client.wait_state(name, "inactive", "dead")
    assert processes(name) == {}
    assert restarts.noted() == {}


async def test_killed_while_the_start_pre_step_runs_it_is_stopped_then_started_once(
    restarts: Restarts,
) -> None:
    client = restarts.client
    name = client.name("unit")
    await client.launch(
        name, unit_lines(("ExecStartPre", "/bin/sleep 299"), ("ExecStart", "/bin/sleep 300"))
    )
    await client.wait_state(name, "activating", "start-pre")
    restarts.kill_9()
    (old_pre,) = processes(name)

    restarts.restart()
    await client.wait_state(name, "activating", "start-pre")

    async def one_new_pre_step() -> dict[int, str] | None:
        now = processes(name)
        return now if old_pre not in now and list(now.values()) == ["/bin/sleep 299"] else None

    await wait_for(one_new_pre_step, "the old ExecStartPre stopped, one new one running")
    assert "unit_orphan_stopped" in restarts.fleet.log()


async def test_killed_during_a_stop_what_it_left_is_stopped(restarts: Restarts) -> None:
    """Killed in ExecStopPost: the main process is gone (its note names a dead process), the
    ExecStopPost process runs on; the restarted localfleet stops it."""
    client = restarts.client
    name = client.name("unit")
    await client.launch(
        name, unit_lines(("ExecStart", "/bin/sleep 300"), ("ExecStopPost", "/bin/sleep 302"))
    )
    await client.wait_state(name, "active", "running")
    await client.set_state(name, "loaded")
    await client.wait_state(name, "deactivating", "stop-post")
    restarts.kill_9()
    assert list(processes(name).values()) == ["/bin/sleep 302"]

    restarts.restart()

    async def nothing_left() -> bool:
        return processes(name) == {}

    await wait_for(nothing_left, "the ExecStopPost left behind to be stopped")
    await client.wait_state(name, "inactive", "dead")
    assert restarts.noted() == {}


async def test_killed_while_shutting_down_a_wanted_unit_it_finishes_the_stop_then_starts_anew(
    restarts: Restarts,
) -> None:
    """A graceful stop of localfleet stops its units; a kill -9 during one's ExecStop leaves a
    main process on its way out: it is not adopted (it would end and leave the unit failed)
    but stopped with its ExecStop, and the unit, still wanted, started once."""
    client = restarts.client
    name = client.name("unit")
    await client.launch(
        name, unit_lines(("ExecStart", "/bin/sleep 300"), ("ExecStop", "/bin/sleep 304"))
    )
    await client.wait_state(name, "active", "running")
    (old_main,) = processes(name)
    restarts.fleet.process.send_signal(signal.SIGTERM)

    async def stopping() -> bool:
        return "/bin/sleep 304" in processes(name).values()

    await wait_for(stopping, "the ExecStop of the shutdown")
    restarts.kill_9()

    restarts.restart()
    await client.wait_state(name, "active", "running")
    (new_main,) = processes(name)
    assert new_main != old_main and processes(name)[new_main] == "/bin/sleep 300"
    assert restarts.noted()[name][1] == new_main


async def test_a_unit_changed_while_localfleet_was_down_stops_the_old_run_first(
    restarts: Restarts, tmp_path: pathlib.Path
) -> None:
    """The old process takes a moment to end on SIGTERM; the new run's first step checks it is
    gone, and both write to one file in the order things happened."""
    events = tmp_path / "events"
    client = restarts.client
    name = client.name("unit")
    on_term = f"sleep 0.5; echo old-stopped >> {events}; exit 0"
    await client.launch(
        name, unit_lines(("ExecStart", f"/bin/sh -c \"trap '{on_term}' TERM; sleep 300 & wait\""))
    )
    await client.wait_state(name, "active", "running")
    restarts.kill_9()
    (old,) = [pid for pid, line in processes(name).items() if line.startswith("/bin/sh")]
    # Running unless gone or a zombie (nobody may reap it: its parent was the killed localfleet).
    check = f"if grep -qv ' Z ' /proc/{old}/stat 2>/dev/null; then echo old-running; else echo new-start; fi"
    new_options = options_of(
        unit_lines(
            ("ExecStartPre", f'/bin/sh -c "{check} >> {events}"'),
            ("ExecStart", "/bin/sleep 300"),
        )
    )
    with restarts.db() as db:  # as a submit of new options would, while localfleet is down
        db.execute("UPDATE units SET options = ? WHERE name = ?", (json.dumps(new_options), name))

    restarts.restart()
    state = await client.wait_state(name, "active", "running")
    assert events.read_text() == "old-stopped\nnew-start\n"
    (new,) = processes(name)
    assert processes(name)[new] == "/bin/sleep 300"
    assert restarts.noted() == {name: (state["hash"], new)}  # the old note replaced
    assert "unit_orphan_stopped" in restarts.fleet.log()


async def test_a_corrupt_run_note_is_dropped_and_its_process_still_adopted(
    restarts: Restarts,
) -> None:
    client = restarts.client
    names = [client.name("a"), client.name("b")]
    for name in names:
        await client.launch(name, unit_lines(("ExecStart", "/bin/sleep 300")))
    for name in names:
        await client.wait_state(name, "active", "running")
    restarts.kill_9()
    before = {name: processes(name) for name in names}
    with restarts.db() as db:
        db.execute("UPDATE runs SET groups = '[1, 2' WHERE unit = ?", (names[0],))
        db.execute("INSERT INTO runs VALUES ('ghost.service', 'machine', 'hash', 'pid?', -5, '[]')")

    restarts.restart()
    for name in names:
        await client.wait_state(name, "active", "running")
    assert {name: processes(name) for name in names} == before
    assert restarts.noted().keys() == set(names)  # the garbage gone, a's run noted again
    log = restarts.fleet.log()
    assert log.count("run_record_unreadable") == 2 and log.count("unit_adopted") == 2


async def test_a_run_note_whose_pid_names_an_unrelated_process_touches_it_not(
    restarts: Restarts,
) -> None:
    """The pid was reused: another start time. The unrelated process and its group are left
    alone, and the unit's own process, found by its mark, is adopted."""
    client = restarts.client
    name = client.name("unit")
    await client.launch(name, unit_lines(("ExecStart", "/bin/sleep 300")))
    await client.wait_state(name, "active", "running")
    restarts.kill_9()
    before = processes(name)
    unrelated = subprocess.Popen(["/bin/sleep", "303"], start_new_session=True)
    try:
        with restarts.db() as db:
            db.execute(
                "UPDATE runs SET pid = ?, groups = ? WHERE unit = ?",
                (unrelated.pid, json.dumps([unrelated.pid]), name),
            )
        restarts.restart()
        await client.wait_state(name, "active", "running")
        assert processes(name) == before
        await client.set_state(name, "loaded")
        await client.wait_state(name, "inactive", "dead")
        assert processes(name) == {}
        assert restarts.fleet.stop() == 0
        assert unrelated.poll() is None  # alive through the restart, the stop and the shutdown
    finally:
        unrelated.kill()
        unrelated.wait()


async def test_killed_again_while_stopping_what_it_left_the_next_start_finishes_the_job(
    restarts: Restarts,
) -> None:
    """The leftover ignores SIGTERM, so the second localfleet is killed within its 10 s grace;
    the third one, finding the same process by its mark, kills it."""
    client = restarts.client
    name = client.name("unit")
    stubborn = "/bin/sh -c \"trap '' TERM; while :; do sleep 0.1; done\""
    await client.launch(name, unit_lines(("ExecStart", stubborn)))
    await client.wait_state(name, "active", "running")
    restarts.kill_9()
    (old,) = [pid for pid, line in processes(name).items() if line.startswith("/bin/sh")]
    with restarts.db() as db:  # no longer launched, as a submit while localfleet is down would
        db.execute("UPDATE units SET desired_state = 'loaded' WHERE name = ?", (name,))

    restarts.restart()

    async def clearing() -> bool:
        return "unit_orphan_stopped" in restarts.fleet.log()

    await wait_for(clearing, "the second localfleet to stop the leftover")
    restarts.kill_9()
    assert old in processes(name)  # SIGTERM changed nothing

    restarts.restart()

    async def nothing_left() -> bool:
        return processes(name) == {}

    await wait_for(nothing_left, "the third localfleet to SIGKILL the leftover", timeout=30)
    await client.wait_state(name, "inactive", "dead")
    assert restarts.noted() == {}
