"""localfleet's registry on disk: one row per change, consistent after a kill -9 in the middle
of writing; and its units, adopted after a kill -9 of localfleet alone."""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import signal
import sqlite3
from typing import Any

import aiohttp
from integration.test_localfleet import (
    MARKER_VARIABLE,
    FleetClient,
    FleetProcess,
    free_port,
    live_processes,
    options_of,
    wait_for,
)

from deployster.localfleet.store import FILE_NAME, RegistryStore, StoredRun


async def test_kill_9_mid_write_restarts_consistent(tmp_path: pathlib.Path) -> None:
    state_dir = tmp_path / "state"
    port = free_port()
    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    acknowledged: dict[str, str] = {}
    sent: set[str] = set()
    enough = asyncio.Event()
    async with aiohttp.ClientSession(base_url=fleet.url) as session:
        client = FleetClient(session, fleet, "crash")

        async def writer(worker: int) -> None:
            for n in range(10_000):
                name = client.name(f"w{worker}-{n}")
                value = f"/bin/sleep {worker}.{n}"
                sent.add(name)
                try:
                    status, _ = await client.put(
                        name, {"name": name, "options": options_of({"ExecStart": value})}
                    )
                except aiohttp.ClientError:
                    return  # killed
                assert status == 201
                acknowledged[name] = value
                if len(acknowledged) >= 200:
                    enough.set()

        writers = [asyncio.create_task(writer(w)) for w in range(4)]
        await asyncio.wait_for(enough.wait(), 60)
        fleet.process.send_signal(signal.SIGKILL)  # in the middle of the writes
        fleet.process.wait()
        await asyncio.gather(*writers)

    with sqlite3.connect(state_dir / FILE_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            client = FleetClient(session, fleet, "crash")
            units = {u["name"]: u for u in await client.paged("/units", "units")}
    finally:
        assert fleet.stop() == 0, fleet.log()
    # Every acknowledged write is there, nothing that was never sent, and each unit whole.
    assert acknowledged.keys() <= units.keys() <= sent
    assert len(units) - len(acknowledged) <= 4  # at most the one write in flight per writer
    for name, unit in units.items():
        (exec_start,) = [o["value"] for o in unit["options"] if o["name"] == "ExecStart"]
        assert exec_start == acknowledged.get(name, exec_start)
        assert unit["desiredState"] == "inactive"


async def test_a_json_registry_of_an_older_localfleet_is_imported(tmp_path: pathlib.Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    options = [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]
    legacy = {
        "version": 1,
        "units": [{"name": "old.service", "options": options, "desired_state": "loaded"}],
        "machine_metadata": {"m1": {"role": "web"}},
    }
    (state_dir / "registry.json").write_text(json.dumps(legacy))
    fleet = FleetProcess(tmp_path, machines=1, state_dir=state_dir, port=free_port())
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            unit = await FleetClient(session, fleet, "legacy").unit("old.service")
    finally:
        assert fleet.stop() == 0, fleet.log()
    assert unit is not None and unit["desiredState"] == "loaded"
    assert not (state_dir / "registry.json").exists()
    assert (state_dir / "registry.json.imported").exists()


async def test_a_database_that_is_not_one_is_refused(tmp_path: pathlib.Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / FILE_NAME).write_bytes(b"this is not a database, but the user's file" * 100)
    try:
        FleetProcess(tmp_path, machines=1, state_dir=state_dir, port=free_port())
    except AssertionError as exc:
        assert "is not a localfleet registry" in str(exc)
    else:
        raise AssertionError("localfleet started on a file that is not its registry")


async def test_kill_9_then_restart_adopts_the_running_units(tmp_path: pathlib.Path) -> None:
    state_dir, stops = tmp_path / "state", tmp_path / "stops"
    port = free_port()
    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    first_marker = fleet.marker
    names = []
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            client = FleetClient(session, fleet, "adopt")
            for n in range(3):
                name = client.name(f"u{n}")
                names.append(name)
                await client.launch(
                    name,
                    [
                        ("Environment", f"UNIT_TAG={name}"),
                        ("ExecStart", "/bin/sleep 300"),
                        ("ExecStopPost", f"/bin/sh -c 'echo {name} >> {stops}'"),
                    ],
                )
            for name in names:
                await client.wait_state(name, "active", "running")
    finally:
        fleet.process.send_signal(signal.SIGKILL)  # localfleet alone: its units live on
        fleet.process.wait()

    def pids(name: str, marker: str = first_marker) -> list[int]:
        return live_processes(**{MARKER_VARIABLE: marker, "UNIT_TAG": name})

    before = {name: pids(name) for name in names}
    assert all(len(found) == 1 for found in before.values()), before

    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            client = FleetClient(session, fleet, "adopt")
            for name in names:
                await client.wait_state(name, "active", "running")
            assert {name: pids(name) for name in names} == before  # the same processes
            copies = set(live_processes(**{MARKER_VARIABLE: fleet.marker})) - {fleet.process.pid}
            assert copies == set()  # and no copies started
            units = {u["name"]: u for u in await client.paged("/units", "units")}
            assert all(units[name]["currentState"] == "launched" for name in names)

            await client.set_state(names[0], "loaded")  # stopping an adopted unit
            await client.wait_state(names[0], "inactive", "dead")
            assert pids(names[0]) == []
            assert pids(names[1]) == before[names[1]] and pids(names[2]) == before[names[2]]
            assert stops.read_text() == f"{names[0]}\n"  # its ExecStopPost ran
    finally:
        assert fleet.stop() == 0, fleet.log()
    assert live_processes(**{MARKER_VARIABLE: first_marker}) == []
    assert sorted(stops.read_text().split()) == sorted(names)
    assert "unit_adopted" in fleet.log()


async def test_a_noted_process_no_longer_wanted_is_stopped_at_restart(
    tmp_path: pathlib.Path,
) -> None:
    state_dir = tmp_path / "state"
    port = free_port()
    fleet = FleetProcess(tmp_path, machines=1, state_dir=state_dir, port=port)
    async with aiohttp.ClientSession(base_url=fleet.url) as session:
        client = FleetClient(session, fleet, "orphan")
        name = client.name("gone")
        await client.launch(name, {"ExecStart": "/bin/sleep 300"})
        await client.wait_state(name, "active", "running")
    fleet.process.send_signal(signal.SIGKILL)
    fleet.process.wait()
    marker = fleet.marker
    assert len(live_processes(**{MARKER_VARIABLE: marker})) == 1
    # While localfleet is down, its unit is changed in the registry (as a newer submit would).
    with sqlite3.connect(state_dir / FILE_NAME) as db:
        db.execute("UPDATE units SET desired_state = 'loaded' WHERE name = ?", (name,))
    fleet = FleetProcess(tmp_path, machines=1, state_dir=state_dir, port=port)
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while live_processes(**{MARKER_VARIABLE: marker}):
            assert asyncio.get_running_loop().time() < deadline, fleet.log()
            await asyncio.sleep(0.1)
    finally:
        assert fleet.stop() == 0, fleet.log()
    assert "unit_orphan_stopped" in fleet.log()


async def test_puts_racing_deletes_leave_one_placement_that_survives_a_kill_9(
    tmp_path: pathlib.Path,
) -> None:
    """Instances that conflict with each other, submitted, changed and destroyed all at once:
    placement stays one instance per machine, and a deleted instance frees its machine for
    one that waited; what is left reads back the same after a kill -9."""
    state_dir, port = tmp_path / "state", free_port()
    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    rng = random.Random(17)
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            client = FleetClient(session, fleet, "race")
            names = [client.name(f"app@{i}") for i in range(8)]
            conflicts = [("Conflicts", client.name("app@*"))]

            async def put(name: str, state: str) -> None:
                options = options_of({"ExecStart": "/bin/sleep 300"}, X_Fleet=conflicts)
                body = {"name": name, "options": options, "desiredState": state}
                status, payload = await client.put(name, body)
                assert status in (201, 204, 409), payload

            async def delete(name: str) -> None:
                await client.destroy(name)

            for _ in range(5):  # rounds of every unit put and deleted concurrently
                operations = [put(name, rng.choice(["loaded", "inactive"])) for name in names]
                operations += [delete(name) for name in rng.sample(names, 4)]
                rng.shuffle(operations)
                await asyncio.gather(*operations)
            for name in names[:3]:  # a last word, so that some units are left
                await put(name, "loaded")

            async def settled() -> list[dict[str, Any]] | None:
                units = await client.paged("/units", "units")
                states = await client.paged("/state", "states")
                placed = [u for u in units if u.get("machineID")]
                wanting = [u for u in units if u["desiredState"] == "loaded"]
                assert len({u["machineID"] for u in placed}) == len(placed)  # one per machine
                assert all(u["desiredState"] == "loaded" for u in placed)
                if len(placed) != min(2, len(wanting)):  # a waiting unit not placed (yet)
                    return None
                loaded = {(u["name"], u["machineID"]) for u in placed}
                if {(s["name"], s["machineID"]) for s in states} != loaded:
                    return None
                return units

            await wait_for(settled, "placement and states to settle")
            # At least three want a machine, two have one: deleting one lets a waiting one in.
            placed = [
                u["name"] for u in await client.paged("/units", "units") if u.get("machineID")
            ]
            await client.destroy(placed[0])
            before = await wait_for(settled, "a waiting instance to take the freed machine")
            assert len([u for u in before if u.get("machineID")]) == 2
    finally:
        fleet.process.send_signal(signal.SIGKILL)
        fleet.process.wait()

    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            client = FleetClient(session, fleet, "race")
            after = await wait_for(settled, "placement and states to settle after the restart")
            assert after == before
    finally:
        assert fleet.stop() == 0, fleet.log()


def test_run_notes_that_do_not_read_as_runs_are_deleted_never_trusted(
    tmp_path: pathlib.Path,
) -> None:
    """Group 0 would be localfleet's own group, a negative pid a whole range: refused with the
    rest of the garbage; the good note and the registry's identity stay."""
    store = RegistryStore(tmp_path / "state")
    good = StoredRun("good.service", "m", "h", 4242, 77, (4242, 4250))
    store.save_run(good)
    identity = store.identity()
    garbage = [
        ("not-json.service", "m", "h", 1, 1, "[1, 2"),
        ("text-pid.service", "m", "h", "pid?", 1, "[1]"),
        ("group-zero.service", "m", "h", 5, 1, "[0]"),
        ("negative.service", "m", "h", -5, 1, "[5]"),
        ("strings.service", "m", "h", 5, 1, '["5"]'),
        ("object.service", "m", "h", 5, 1, '{"5": 5}'),
        ("number.service", "m", "h", 5, 1, "5"),
        ("float-time.service", "m", "h", 5, 1.5, "[5]"),
        ("true-group.service", "m", "h", 5, 1, "[true]"),
    ]
    with sqlite3.connect(store.path) as db:
        db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", garbage)
    assert store.runs() == {("good.service", "m"): good}
    store.close()
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT unit FROM runs").fetchall() == [("good.service",)]
    reopened = RegistryStore(tmp_path / "state")
    assert reopened.identity() == identity and len(identity) == 32
    other = RegistryStore(tmp_path / "other")
    assert other.identity() != identity
    reopened.close()
    other.close()
