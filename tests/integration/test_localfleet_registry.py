"""localfleet's registry on disk: one row per change, and consistent after a kill -9 in the
middle of writing."""

from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import sqlite3

import aiohttp
from integration.test_localfleet import FleetClient, FleetProcess, free_port, options_of

from deployster.localfleet.store import FILE_NAME


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
