"""Deployster's fleet client against localfleet, over TCP and over a unix socket."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import eventually

from deployster.fleet import (
    FleetClient,
    FleetConflictError,
    FleetNotFoundError,
    FleetRejectedError,
    FleetUnavailableError,
    UnitOption,
    UnitState,
)

SLEEPER = [UnitOption(section="Service", name="ExecStart", value="/bin/sleep 300")]


@pytest.fixture(scope="module")
def unix_localfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("lf-unix")
    sock = state / "fleet.sock"
    log = open(state / "log", "wb")
    child = subprocess.Popen(
        [sys.executable, "-m", "deployster", "localfleet", "--listen", f"unix:{sock}"],
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"unix://{sock}"
    finally:
        child.terminate()
        child.wait(30)
        log.close()


async def test_lists_every_page_past_fleets_page_size(localfleet: str) -> None:
    names = [f"page-{i:03d}.service" for i in range(250)]
    async with FleetClient(localfleet) as fleet:
        try:
            for name in names:
                await fleet.create_unit(name, SLEEPER)
            listed = [u.name for u in await fleet.list_units() if u.name.startswith("page-")]
            assert sorted(listed) == names  # every unit once, none lost between pages
            rows = [row async for page in fleet.unit_rows() for row in page]
            assert [row for row in rows if row[0].startswith("page-")] == [
                (name, "inactive", "inactive", "") for name in names
            ]  # the same units as rows, in fleet's order
            states = await fleet.list_states()
            assert all(not s.name.startswith("page-") for s in states)  # never launched
        finally:
            for name in names:
                await fleet.destroy_unit(name)


async def test_create_launch_state_destroy_over_a_unix_socket(unix_localfleet: str) -> None:
    name = "sock-test@1.service"
    async with FleetClient(unix_localfleet) as fleet:
        machines = await fleet.list_machines()
        assert len(machines) == 1 and len(machines[0].id) == 32
        await fleet.create_unit(name, SLEEPER)
        with pytest.raises(FleetConflictError):  # same options again: fleet says 409
            await fleet.create_unit(name, SLEEPER)
        await fleet.set_desired_state(name, "launched")

        async def running() -> bool:
            states = await fleet.list_states(unit_name=name)
            return bool(states) and (states[0].active_state, states[0].sub_state) == (
                "active",
                "running",
            )

        await eventually(running)
        unit = await fleet.get_unit(name)
        assert (unit.desired_state, unit.current_state, unit.machine_id) == (
            "launched",
            "launched",
            machines[0].id,
        )
        await fleet.destroy_unit(name)
        with pytest.raises(FleetNotFoundError):
            await fleet.destroy_unit(name)
        with pytest.raises(FleetNotFoundError):
            await fleet.get_unit(name)


async def test_fleet_refusals_are_typed(localfleet: str) -> None:
    async with FleetClient(localfleet) as fleet:
        with pytest.raises(FleetRejectedError, match="400"):
            await fleet.create_unit("no-suffix", SLEEPER)
        with pytest.raises(FleetConflictError, match="unit does not exist and options field empty"):
            await fleet.create_unit("empty.service", [])


async def test_unreachable_fleet_is_typed(tmp_path: Path) -> None:
    async with FleetClient(f"unix://{tmp_path}/missing.sock") as fleet:
        with pytest.raises(FleetUnavailableError, match="unreachable"):
            await fleet.list_units()


@pytest.mark.parametrize(
    ("second_page", "problem"),
    [
        ("<html>502 Bad Gateway</html>", "not JSON"),
        ('{"units": [{"name": "b.service", "options"', "not JSON"),
        ('{"units": [{"name": ["b.service"]}]}', "units.0.name: Input should be a valid string"),
        ('{"units": {"name": "b.service"}}', "does not fit fleet's schema"),
        ("[]", "does not fit fleet's schema"),
        ("", "not JSON"),
    ],
)
async def test_a_corrupt_page_is_fleet_unavailable_with_a_sentence(
    aiohttp_server: Any, second_page: str, problem: str
) -> None:
    async def units(request: web.Request) -> web.Response:
        if "nextPageToken" not in request.query:
            first = {"units": [{"name": "a.service"}], "nextPageToken": "ZAACAA=="}
            return web.json_response(first)
        return web.Response(text=second_page, content_type="application/json")

    app = web.Application()
    app.router.add_get("/fleet/v1/units", units)
    server = await aiohttp_server(app)
    async with FleetClient(f"http://127.0.0.1:{server.port}") as fleet:
        with pytest.raises(FleetUnavailableError, match="fleet answered GET /units with") as caught:
            await fleet.list_units()
    assert problem in str(caught.value)


async def serve_pages(aiohttp_server: Any, path: str, pages: list[str]) -> str:
    """A fleet whose ``path`` answers ``pages`` in turn, chained by nextPageToken."""

    async def answer(request: web.Request) -> web.Response:
        n = int(request.query.get("nextPageToken", "0"))
        return web.Response(text=pages[n], content_type="application/json")

    app = web.Application()
    app.router.add_get(f"/fleet/v1{path}", answer)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_rows_read_keys_as_fleet_shapes_do(aiohttp_server: Any) -> None:
    pages = [
        '{"units": [{"name": "a.service", "desiredState": "launched", "options": [1, {}]}],'
        ' "nextPageToken": "1"}',
        '{"Units": [{"NAME": "b.service", "machineid": "m1", "currentState": null}]}',
    ]
    async with FleetClient(await serve_pages(aiohttp_server, "/units", pages)) as fleet:
        rows = [row async for page in fleet.unit_rows() for row in page]
    # Options are skipped, not decoded; keys of any case; null is empty.
    assert rows == [("a.service", "launched", "", ""), ("b.service", "", "", "m1")]


@pytest.mark.parametrize(
    ("second_page", "problem"),
    [
        ("<html>502 Bad Gateway</html>", "not JSON"),
        ('{"states": [{"name": "b.service"', "not JSON"),
        ('{"states": [{"name": ["b.service"]}]}', "states.0: a value that is not a string"),
        ('{"states": [{"name": "b.service"}, 7]}', "states.1: not a JSON object"),
        ('{"states": {"name": "b.service"}}', "states: not a JSON array"),
        ('{"states": [], "nextPageToken": 2}', "a string nextPageToken"),
        ("[]", "does not fit fleet's schema"),
        ("", "not JSON"),
    ],
)
async def test_a_corrupt_page_of_rows_is_fleet_unavailable_with_a_sentence(
    aiohttp_server: Any, second_page: str, problem: str
) -> None:
    first = '{"states": [{"name": "a.service"}], "nextPageToken": "1"}'
    endpoint = await serve_pages(aiohttp_server, "/state", [first, second_page])
    async with FleetClient(endpoint) as fleet:
        with pytest.raises(FleetUnavailableError, match="fleet answered GET /state with") as caught:
            [row async for page in fleet.state_rows() for row in page]
    assert problem in str(caught.value)


def test_endpoint_forms() -> None:
    with pytest.raises(ValueError, match="unix:///PATH"):
        FleetClient("tcp://127.0.0.1:1")


async def test_a_failed_unit_is_described_with_its_last_log_lines(localfleet: str) -> None:
    name = "journal-test@1.service"
    failing = [
        UnitOption(
            section="Service",
            name="ExecStartPre",
            value="/bin/sh -c 'echo starting; echo cannot read /etc/app.conf >&2; exit 3'",
        ),
        *SLEEPER,
    ]
    async with FleetClient(localfleet) as fleet:
        await fleet.create_unit(name, failing)
        await fleet.set_desired_state(name, "launched")
        try:

            async def failed() -> UnitState | None:
                states = await fleet.list_states(unit_name=name)
                return states[0] if states and states[0].active_state == "failed" else None

            state = await eventually(failed)
            described = await fleet.describe_failure(state)
            head, _, lines = described.partition("\n")
            assert head == f"unit {name} failed (systemd failed/failed); its last log lines:"
            assert "  sh[" in lines and "]: cannot read /etc/app.conf" in lines
            assert "ExecStartPre process exited, code=exited, status=3" in lines
            assert len(lines.splitlines()) <= 10
            assert await fleet.journal(name, 1) == [described.splitlines()[-1].strip()]
            # Garbage: a line count fleet's API refuses, a unit nobody loaded.
            assert await fleet.journal(name, 0) is None
            assert await fleet.journal(name, 10**6) is None
            assert await fleet.journal("nobody@1.service") is None
        finally:
            await fleet.destroy_unit(name)
        gone = UnitState(name=name, machine_id=state.machine_id, active_state="failed")
        described = await fleet.describe_failure(gone)
        assert described.endswith(
            f"its log: fleetctl journal {name} (or journalctl -u {name} "
            f"on machine {state.machine_id[:8]})"
        )


async def test_a_failure_is_still_described_when_fleet_is_gone(tmp_path: Path) -> None:
    state = UnitState(name="web@1.service", active_state="failed", sub_state="failed")
    async with FleetClient(f"unix://{tmp_path}/missing.sock") as fleet:
        assert await fleet.describe_failure(state) == (
            "unit web@1.service failed (systemd failed/failed); "
            "its log: fleetctl journal web@1.service (or journalctl -u web@1.service)"
        )
