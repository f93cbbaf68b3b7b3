"""localfleet's agent and embedding, in-process: supervision, goals that change mid-stop, shutdown, unix sockets."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import structlog
from helpers import process_running

from deployster.fleet import UnitOption, UnitState
from deployster.localfleet import (
    LocalFleet,
    StartupError,
)
from deployster.localfleet import (
    agent as agent_module,
)
from deployster.localfleet import (
    service as service_module,
)
from deployster.localfleet.agent import Agent, AgentContext
from deployster.localfleet.model import DesiredInstance
from deployster.localfleet.service import MARK_VARIABLE, ProcessMark
from deployster.localfleet.store import RegistryStore
from deployster.localfleet.unitfile import unit_hash

MACHINE = "0123456789abcdef0123456789abcdef"
DEADLINE = 10.0


def desired(name: str, *lines: tuple[str, str], launched: bool = True) -> DesiredInstance:
    options = tuple(UnitOption(section="Service", name=key, value=value) for key, value in lines)
    return DesiredInstance(name, MACHINE, options, unit_hash(options), launched)


@pytest.fixture
async def agent(tmp_path: pathlib.Path) -> AsyncIterator[Agent]:
    agent = Agent(
        AgentContext(hostname="host", base_environment=dict(os.environ), log_dir=tmp_path / "logs")
    )
    try:
        yield agent
    finally:
        await agent.shutdown()


def state_of(agent: Agent, name: str) -> UnitState | None:
    found = agent.states(unit_name=name)
    return agent.state(found[0]) if found else None


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def is_in(
    agent: Agent, name: str, active: str, sub: str, unit_hash: str | None = None
) -> Callable[[], bool]:
    def check() -> bool:
        state = state_of(agent, name)
        return (
            state is not None
            and (state.active_state, state.sub_state) == (active, sub)
            and (unit_hash is None or state.hash == unit_hash)
        )

    return check


async def test_a_crashing_run_fails_its_unit_and_the_agent_keeps_going(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build_environment = service_module.build_environment

    def build_environment(spec, base):
        if dict(spec.environment).get("CRASH") == "yes":
            raise RuntimeError("boom")
        return real_build_environment(spec, base)

    monkeypatch.setattr(service_module, "build_environment", build_environment)
    broken = desired(
        "broken.service", ("Environment", "CRASH=yes"), ("ExecStart", "/bin/sleep 300")
    )
    healthy = desired("healthy.service", ("ExecStart", "/bin/sleep 300"))
    with structlog.testing.capture_logs() as logs:
        agent.apply({(broken.unit_name, MACHINE): broken})
        await wait_until(is_in(agent, "broken.service", "failed", "failed"), "broken to fail")
        agent.apply({(broken.unit_name, MACHINE): broken, (healthy.unit_name, MACHINE): healthy})
        await wait_until(is_in(agent, "healthy.service", "active", "running"), "healthy to run")
    errors = [entry for entry in logs if entry["event"] == "unit_run_error"]
    assert [(e["unit"], e["machine"], e["log_level"]) for e in errors] == [
        ("broken.service", MACHINE, "error")
    ]


async def test_a_crashing_load_fails_its_unit_and_new_options_retry(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = agent_module.build_service_spec

    def build_service_spec(options, unit_name, machine_id, hostname):
        if any(option.value == "/bin/crash" for option in options):
            raise RuntimeError("parser bug")
        return real_build(options, unit_name, machine_id, hostname)

    monkeypatch.setattr(agent_module, "build_service_spec", build_service_spec)
    bad = desired("unit.service", ("ExecStart", "/bin/crash"))
    with structlog.testing.capture_logs() as logs:
        agent.apply({(bad.unit_name, MACHINE): bad})
        await wait_until(is_in(agent, "unit.service", "failed", "failed"), "the unit to fail")
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == [
        "unit_instance_error"
    ]
    assert state_of(agent, "unit.service").load_state == "error"
    good = desired("unit.service", ("ExecStart", "/bin/sleep 300"))
    agent.apply({(good.unit_name, MACHINE): good})
    await wait_until(
        is_in(agent, "unit.service", "active", "running", good.unit_hash), "the new options to run"
    )


async def test_goal_changes_during_a_slow_stop_are_honoured_in_order(
    agent: Agent, tmp_path: pathlib.Path
) -> None:
    first = desired(
        "app.service",
        ("ExecStart", "/bin/sleep 300"),
        ("ExecStop", f"/bin/sh -c 'sleep 0.3; echo first >> {tmp_path}/stops'"),
    )
    second = desired(
        "app.service",
        ("ExecStart", f"/bin/sh -c 'echo second >> {tmp_path}/starts; exec sleep 300'"),
    )
    key = ("app.service", MACHINE)
    agent.apply({key: first})
    await wait_until(is_in(agent, "app.service", "active", "running"), "the first unit to run")
    agent.apply({key: None})  # destroyed ...
    await wait_until(is_in(agent, "app.service", "deactivating", "stop"), "the slow stop to begin")
    agent.apply({key: second})  # ... and created again while it stops
    await wait_until(
        is_in(agent, "app.service", "active", "running", second.unit_hash), "the second unit to run"
    )
    assert (tmp_path / "stops").read_text() == "first\n"
    assert (tmp_path / "starts").read_text() == "second\n"


async def test_a_failed_unit_is_not_restarted_until_stopped_and_started(
    agent: Agent, tmp_path: pathlib.Path
) -> None:
    unit = desired(
        "once.service", ("ExecStart", f"/bin/sh -c 'echo run >> {tmp_path}/runs; exit 1'")
    )
    key = (unit.unit_name, MACHINE)
    agent.apply({key: unit})
    await wait_until(is_in(agent, "once.service", "failed", "failed"), "the unit to fail")
    agent.apply(
        {key: unit}
    )  # still desired launched: fleet's agent already called start, nothing to do
    await asyncio.sleep(0.2)
    assert (tmp_path / "runs").read_text() == "run\n"
    assert agent.job_state("once.service", MACHINE) == "launched"
    stopped = desired(
        "once.service",
        ("ExecStart", f"/bin/sh -c 'echo run >> {tmp_path}/runs; exit 1'"),
        launched=False,
    )
    agent.apply({key: stopped})
    await wait_until(lambda: agent.job_state("once.service", MACHINE) == "loaded", "the stop")
    assert is_in(
        agent, "once.service", "failed", "failed"
    )()  # stopping a failed unit leaves it failed
    agent.apply({key: unit})
    await wait_until(lambda: (tmp_path / "runs").read_text() == "run\nrun\n", "the second start")


async def test_shutdown_stops_every_unit(tmp_path: pathlib.Path) -> None:
    agent = Agent(AgentContext(hostname="host", base_environment=dict(os.environ), log_dir=None))
    units = {
        (f"u{index}.service", MACHINE): desired(
            f"u{index}.service",
            ("ExecStart", f"/bin/sh -c 'echo $$$$ > {tmp_path}/u{index}; exec sleep 300'"),
            ("ExecStopPost", f"/bin/touch {tmp_path}/u{index}.stopped"),
        )
        for index in range(3)
    }
    agent.apply(units)
    for name, _ in units:
        await wait_until(is_in(agent, name, "active", "running"), f"{name} to run")
    await wait_until(
        lambda: all((tmp_path / f"u{index}").exists() for index in range(3)), "the pid files"
    )
    pids = [int((tmp_path / f"u{index}").read_text()) for index in range(3)]
    await asyncio.wait_for(agent.shutdown(), DEADLINE)
    assert agent.states() == []
    assert not any(process_running(pid) for pid in pids)
    assert all((tmp_path / f"u{index}.stopped").exists() for index in range(3))


async def test_embedded_on_a_unix_socket_with_a_small_page_size(tmp_path: pathlib.Path) -> None:
    socket_path = tmp_path / "fleet.sock"
    socket_path.touch()
    with pytest.raises(StartupError, match="not a socket"):
        await LocalFleet(f"unix:{socket_path}").start()
    assert socket_path.exists()  # a file that is not a socket is never deleted
    socket_path.unlink()
    async with LocalFleet(f"unix:{socket_path}", machines=2, token_limit=2) as fleet:
        assert fleet.endpoint == f"unix://{socket_path}"
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with aiohttp.ClientSession(connector=connector) as session:
            for index in range(5):
                options = [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]
                async with session.put(
                    f"http://localhost/fleet/v1/units/u{index}.service", json={"options": options}
                ) as response:
                    assert response.status == 201
            pages, query = [], {}
            while True:
                async with session.get("http://localhost/fleet/v1/units", params=query) as response:
                    payload = await response.json()
                pages.append([unit["name"] for unit in payload.get("units", [])])
                if "nextPageToken" not in payload:
                    break
                query = {"nextPageToken": payload["nextPageToken"]}
            assert pages == [
                ["u0.service", "u1.service"],
                ["u2.service", "u3.service"],
                ["u4.service"],
            ]
            async with session.get(
                "http://localhost/fleet/v1/units", params={"nextPageToken": "ZAACAA=="}
            ) as response:
                assert response.status == 400  # a token for page size 100 is not one of ours
    assert not socket_path.exists()


async def test_a_live_socket_is_never_taken_over_a_stale_one_is(tmp_path: pathlib.Path) -> None:
    socket_path = tmp_path / "fleet.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_path))
    stale.close()  # a socket file nobody listens on: what a killed run leaves
    async with LocalFleet(f"unix:{socket_path}") as first:
        with pytest.raises(StartupError, match="is in use"):
            await LocalFleet(f"unix:{socket_path}").start()
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://localhost/fleet/v1/machines") as response,
        ):
            assert response.status == 200  # the first one still answers on its socket
        assert first.endpoint == f"unix://{socket_path}"


def left_running(
    store: RegistryStore, goal: DesiredInstance, *argv: str
) -> subprocess.Popen[bytes]:
    """A main process a killed localfleet started for `goal`'s options and never noted."""
    mark = ProcessMark(store.identity(), MACHINE, goal.unit_name, goal.unit_hash)
    return subprocess.Popen(
        argv, env={**os.environ, MARK_VARIABLE: mark.value("ExecStart")}, start_new_session=True
    )


async def test_a_leftover_of_options_that_no_longer_load_is_stopped(
    tmp_path: pathlib.Path,
) -> None:
    store = RegistryStore(tmp_path / "state")
    goal = desired("old.service", ("Type", "forking"), ("ExecStart", "/bin/sleep 300"))
    leftover = left_running(store, goal, "/bin/sleep", "300")
    agent = Agent(AgentContext("host", dict(os.environ), tmp_path / "logs", runs=store))
    try:
        agent.apply({(goal.unit_name, MACHINE): goal})
        await wait_until(is_in(agent, "old.service", "failed", "failed"), "the refused start")
        assert leftover.wait(DEADLINE) == -signal.SIGTERM
    finally:
        leftover.kill()
        await agent.shutdown()
        store.close()


async def test_a_launch_waits_until_a_leftover_that_ignores_sigterm_is_killed(
    tmp_path: pathlib.Path,
) -> None:
    """Not wanted at the restart, wanted again a moment later with other options: the new run
    starts only once the old process is gone, SIGKILLed after the 10 s grace."""
    store = RegistryStore(tmp_path / "state")
    old = desired("unit.service", ("ExecStart", "/bin/sh -c 'sleep 300'"))
    leftover = left_running(
        store, old, "/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"
    )
    check = f"grep -qv ' Z ' /proc/{leftover.pid}/stat && echo old-running || echo new-start"
    new = desired(
        "unit.service",
        ("ExecStartPre", f'/bin/sh -c "{check} >> {tmp_path}/events"'),
        ("ExecStart", "/bin/sleep 300"),
    )
    agent = Agent(AgentContext("host", dict(os.environ), tmp_path / "logs", runs=store))
    started = time.monotonic()
    try:
        agent.apply({})  # the first apply: nothing wanted
        agent.apply({(new.unit_name, MACHINE): new})
        while not is_in(agent, "unit.service", "active", "running")():
            assert time.monotonic() - started < 10 + DEADLINE, state_of(agent, "unit.service")
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 10
        assert leftover.wait(DEADLINE) == -signal.SIGKILL
        assert (tmp_path / "events").read_text() == "new-start\n"
    finally:
        leftover.kill()
        await agent.shutdown()
        store.close()
