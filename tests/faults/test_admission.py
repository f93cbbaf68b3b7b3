"""Whatever fails between taking a service's lock and submitting its units releases the lock
and fails the deploy: the service is never left blocked."""

from __future__ import annotations

from typing import Any

from faults.conftest import Child, assert_settled
from integration.conftest import Api


async def test_fleet_away_while_planning_answers_502_and_frees_the_lock(
    fault_api: Api, fault_fleet: tuple[str, Child]
) -> None:
    api = fault_api
    async with fault_fleet[1].paused(0):
        # Planning reads fleet's units under the lock: fleet's client gives up after 10 s.
        refused = await api.deploy({"version": "v1"}, expect=502)
    assert "fleet" in refused["description"], refused
    assert await api.deployster.store.locks.holder(api.service) is None
    done = await api.deployed({"version": "v1"})  # the service is not blocked
    assert done["state"] == "succeeded", done
    await assert_settled(api, done, done["units"])


async def test_a_crash_while_submitting_fails_the_deploy_and_frees_the_lock(
    fault_api: Api, monkeypatch: Any
) -> None:
    api = fault_api
    fleet = api.deployster.fleet

    async def crash(name: str, state: str) -> None:
        raise RuntimeError("a bug between create and launch")

    monkeypatch.setattr(fleet, "set_desired_state", crash)
    failed = await api.deploy({"version": "v1", "instance_count": 2}, expect=502)
    assert "a bug between create and launch" in failed["description"], failed
    records = (await (await api.client.get(api.url("/deploys"), headers=api.auth)).json())[
        "deploys"
    ]
    assert records[0]["state"] == "failed" and "submitting" in records[0]["error"], records
    assert await api.deployster.store.locks.holder(api.service) is None
    assert await api.units() == []  # the units created before the crash are gone again

    monkeypatch.undo()
    done = await api.deployed({"version": "v1"})
    assert done["state"] == "succeeded", done
    await assert_settled(api, done, done["units"])  # nothing of the failed deploy runs
