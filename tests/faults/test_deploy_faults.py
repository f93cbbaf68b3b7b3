"""A deploy under the faults a cluster really has, with load through Traefik all along: it
ends ``succeeded`` or honestly ``rolled_back``, and no request fails while an old release
serves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from faults.conftest import Paused
from helpers import eventually
from integration.conftest import FAST_POLICY, Api
from integration.test_zero_downtime import Load, wait_serving
from integration.traefik import Traefik

from deployster.policy import HealthPolicy


async def under_load(traefik: Traefik, api: Api, work: Callable[[], Awaitable[Any]]) -> Load:
    """Run ``work`` while 6 clients request the service through Traefik."""
    load = Load(traefik.web_url, f"{api.service}.localhost")
    running = asyncio.create_task(load.run(clients=6))
    try:
        await asyncio.sleep(0.3)
        await work()
        await asyncio.sleep(0.3)
    finally:
        load.stop()
        await running
    print(f"\n[faults] {load.ok} requests, {len(load.failures)} failed, {dict(load.versions)}")
    return load


async def step_reached(
    api: Api, deploy_id: str, kind: str, timeout: float = 30, count: int = 1
) -> None:
    """Wait until the deploy's record shows ``count`` progress events of ``kind``."""

    async def reached() -> bool:
        kinds = [e["kind"] for e in (await api.record(deploy_id))["events"]]
        return kinds.count(kind) >= count

    await eventually(reached, timeout=timeout, interval=0.05)


@pytest.mark.parametrize(
    "at",
    ["submitted", "retiring"],
    ids=["while the new release comes up", "while the old release is drained and destroyed"],
)
async def test_etcd_paused_10s_mid_deploy_the_deploy_still_succeeds(
    fault_api: Api, fault_traefik: Traefik, fault_etcd: Paused, at: str
) -> None:
    api = fault_api
    # Instances stay in the waiting step 2 s (min_healthy_time): a pause at "submitted" lands
    # there; at "retiring" it lands in the drain, before the old units are destroyed.
    await api.deployster.store.save_policy(
        api.service,
        FAST_POLICY.model_copy(
            update={"drain": 0.5, "min_healthy_time": 2, "instance_deadline": 40}
        ),
    )
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    outcome: dict[str, Any] = {}

    async def deploy_with_a_pause() -> None:
        second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
        await step_reached(api, second["id"], at)
        paused_at = time.monotonic()
        async with fault_etcd.paused(10):
            pass
        outcome.update(await api.finished(second["id"], timeout=60))
        outcome["after_pause"] = time.monotonic() - paused_at - 10

    load = await under_load(fault_traefik, api, deploy_with_a_pause)
    kinds = [e["kind"] for e in outcome["events"]]
    print(f"[faults] etcd pause: ended {outcome['after_pause']:.1f} s after etcd came back")
    assert outcome["state"] == "succeeded", outcome
    assert "rolling_back" not in kinds
    assert load.failures == [] and load.versions["v1"] > 0
    assert sorted(await api.units()) == sorted(outcome["units"])
    assert await api.deployster.store.locks.holder(api.service) is None


async def test_fleet_unreachable_during_destroy_no_false_success(
    fault_api: Api, fault_traefik: Traefik, fault_fleet: tuple[str, Paused]
) -> None:
    api = fault_api
    await api.deployster.store.save_policy(
        api.service, FAST_POLICY.model_copy(update={"drain": 1.0})
    )
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    seen: dict[str, Any] = {}

    async def deploy_with_fleet_away() -> None:
        second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
        await step_reached(api, second["id"], "retiring")
        # Drained after 1 s: the destroy step meets a fleet that does not answer.
        async with fault_fleet[1].paused(8):
            pass
        seen["at_resume"] = await api.record(second["id"])
        seen["done"] = await api.finished(second["id"], timeout=60)

    load = await under_load(fault_traefik, api, deploy_with_fleet_away)
    assert seen["at_resume"]["state"] == "running", seen["at_resume"]  # never a false success
    done = seen["done"]
    assert done["state"] == "succeeded", done
    assert [e["kind"] for e in done["events"]][-2:] == ["previous_destroyed", "succeeded"]
    assert sorted(await api.units()) == sorted(done["units"])  # the old units are gone
    assert load.failures == []
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v2")
    assert await api.deployster.store.locks.holder(api.service) is None


async def test_an_etcd_error_while_finishing_a_rollback_keeps_the_live_release(
    fault_api: Api, fault_traefik: Traefik, fault_etcd: Paused
) -> None:
    api = fault_api
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    await api.deployster.store.save_policy(
        api.service,
        FAST_POLICY.model_copy(
            update={
                "drain": 0.5,
                "instance_deadline": 3,
                "health": HealthPolicy(interval=0.1, healthy_threshold=1),
            }
        ),
    )
    seen: dict[str, Any] = {}

    async def failing_deploy_with_etcd_away() -> None:
        bad = (
            await api.deploy(
                {
                    "version": "v2",
                    "destroy_previous": True,
                    "env": {"DEPLOYSTER_WORKLOAD_HEALTH": "fail"},
                }
            )
        )["deploy"]
        await step_reached(api, bad["id"], "rolling_back")
        async with fault_etcd.paused(4):
            pass
        seen["done"] = await api.finished(bad["id"], timeout=60)

    load = await under_load(fault_traefik, api, failing_deploy_with_etcd_away)
    done = seen["done"]
    assert done["state"] == "rolled_back", done
    assert "retiring" not in [e["kind"] for e in done["events"]]  # never the switch
    assert sorted(await api.units()) == sorted(first["units"])  # the live release is intact
    assert load.failures == [] and "v2" not in load.versions
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    assert await api.deployster.store.locks.holder(api.service) is None
