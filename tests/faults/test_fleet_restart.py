"""localfleet killed with SIGKILL and started again mid-deploy: its units' processes outlive
it and are adopted by the new run, never copied; the deploy ends honestly, and the previous
release serves until the switch."""

from __future__ import annotations

from typing import Any

import pytest
from faults.conftest import Child, assert_settled, workloads
from faults.test_deploy_faults import step_reached, under_load
from helpers import eventually
from integration.conftest import Api
from integration.test_zero_downtime import wait_serving
from integration.traefik import Traefik


async def running(api: Api, units: list[str]) -> bool:
    """fleet reports every one of ``units`` active/running (localfleet noted their processes
    for a restart to adopt)."""
    states = await api.fleet.list_states()
    up = {s.name for s in states if (s.active_state, s.sub_state) == ("active", "running")}
    return set(units) <= up


@pytest.mark.parametrize(
    "at",
    ["starting", "retiring"],
    ids=["while the new units start", "while the old release is drained and destroyed"],
)
async def test_localfleet_killed_and_restarted_mid_deploy(
    fault_api: Api, fault_traefik: Traefik, fault_fleet: tuple[str, Child], at: str
) -> None:
    api = fault_api
    fleet = fault_fleet[1]
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    seen: dict[str, Any] = {}

    async def deploy_with_fleet_killed() -> None:
        second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
        if at == "starting":
            # Launched, still booting (the workload announces itself a second or so later):
            # it writes its first log lines after localfleet, which read them, is gone.
            units = (await api.record(second["id"]))["units"]
            await eventually(lambda: running(api, units), timeout=20, interval=0.02)
        else:
            await step_reached(api, second["id"], at)
        async with fleet.killed(2):
            seen["while_dead"] = sorted(workloads(api.service).values())
        seen["done"] = await api.finished(second["id"], timeout=60)

    load = await under_load(fault_traefik, api, deploy_with_fleet_killed)
    done = seen["done"]
    assert set(first["units"]) <= set(seen["while_dead"])  # the units outlived localfleet
    assert done["state"] == "succeeded", done
    assert load.failures == [] and load.versions["v1"] > 0
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v2")
    await assert_settled(api, done, done["units"])
    assert "unit_adopted" in fleet.log.read_text()
