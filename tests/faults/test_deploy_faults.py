"""A deploy under the faults a cluster really has, with load through Traefik all along: it
ends ``succeeded`` or honestly ``rolled_back``, and no request fails while an old release
serves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from faults.conftest import ENDED, Child, Paused, assert_settled
from helpers import eventually
from integration.conftest import FAST_POLICY, Api
from integration.test_zero_downtime import wait_serving
from integration.traefik import Traefik

from deployster.policy import HealthPolicy
from deployster.testing.load import Load

# Each load client waits 10 ms between two requests: still some 200 requests a second, so
# that a window of failed requests shows, while the parts under test keep the 2 cores.
PACE = 0.01


async def under_load(traefik: Traefik, api: Api, work: Callable[[], Awaitable[Any]]) -> Load:
    """Run ``work`` while 3 clients request the service through Traefik."""
    load = Load(traefik.web_url, f"{api.service}.localhost", pause=PACE)
    async with load.running(clients=3):
        await asyncio.sleep(0.3)
        await work()
        await asyncio.sleep(0.3)
    print(f"\n[faults] {load.summary()}")
    return load


async def step_reached(
    api: Api, deploy_id: str, kind: str, timeout: float = 30, count: int = 1
) -> None:
    """Wait until the deploy's record shows ``count`` progress events of ``kind``."""

    async def reached() -> bool:
        kinds = [e["kind"] for e in (await api.record(deploy_id))["events"]]
        return kinds.count(kind) >= count

    await eventually(reached, timeout=timeout, interval=0.05)


# The steps of a deploy that replaces a running release, by the progress event that starts
# them: "planned" is the API's answer (the worker submits the units right then).
STEPS = ["planned", "submitted", "routed", "retiring"]
STEP_IDS = [
    "while the units are submitted",
    "while the new release comes up",
    "during the switch",
    "while the old release is drained and destroyed",
]


async def deploy_through(
    api: Api, traefik: Traefik, fault: Callable[[], Any], at: str
) -> dict[str, Any]:
    """v1 serving, then v2 replacing it under load, with ``fault`` (an async context) entered
    once the deploy reached ``at``. Returns v1's record (``first``), v2's when the fault
    ended (``at_resume``) and at its end (``done``), the seconds from the fault's end to the
    deploy's (``after``) and the ``load``."""
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(traefik, f"{api.service}.localhost", "v1")
    seen: dict[str, Any] = {"first": first}

    async def deploy_with_the_fault() -> None:
        second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
        if at != "planned":
            await step_reached(api, second["id"], at)
        async with fault():
            pass
        resumed = time.monotonic()
        seen["at_resume"] = await api.record(second["id"])
        seen["done"] = await api.finished(second["id"], timeout=60)
        seen["after"] = time.monotonic() - resumed

    seen["load"] = await under_load(traefik, api, deploy_with_the_fault)
    return seen


@pytest.mark.parametrize("at", STEPS, ids=STEP_IDS)
async def test_etcd_paused_mid_deploy_the_deploy_still_succeeds(
    fault_api: Api, fault_traefik: Traefik, fault_etcd: Paused, at: str
) -> None:
    """Paused longer than etcd's request deadline (5 s): every call in flight fails."""
    api = fault_api
    # Instances stay in the waiting step 1 s (min_healthy_time): a pause at "submitted" lands
    # there; at "retiring" it lands in the drain, before the old units are destroyed.
    await api.deployster.store.save_policy(
        api.service,
        FAST_POLICY.model_copy(
            update={"drain": 0.5, "min_healthy_time": 1, "instance_deadline": 40}
        ),
    )
    seen = await deploy_through(api, fault_traefik, lambda: fault_etcd.paused(6), at)
    done, load = seen["done"], seen["load"]
    kinds = [e["kind"] for e in done["events"]]
    print(f"[faults] etcd paused at {at}: ended {seen['after']:.1f} s after etcd came back")
    assert done["state"] == "succeeded", done
    assert "rolling_back" not in kinds  # a healthy release is never rolled back for a blink
    assert load.failures == [] and load.versions["v1"] > 0
    await assert_settled(api, done, done["units"])


@pytest.mark.parametrize(
    "at", ["planned", "submitted", "retiring"], ids=[STEP_IDS[0], STEP_IDS[1], STEP_IDS[3]]
)
async def test_fleet_unreachable_mid_deploy_no_false_success(
    fault_api: Api, fault_traefik: Traefik, fault_fleet: tuple[str, Child], at: str
) -> None:
    api = fault_api
    await api.deployster.store.save_policy(
        api.service, FAST_POLICY.model_copy(update={"drain": 1.0})
    )
    # fleet's client waits 10 s for an answer: frozen 4 s, fleet only delays each step. At
    # "retiring", drained after 1 s, the destroy step meets a fleet that does not answer.
    seen = await deploy_through(api, fault_traefik, lambda: fault_fleet[1].paused(4), at)
    at_resume, done, load = seen["at_resume"], seen["done"], seen["load"]
    assert at_resume["state"] not in ENDED, at_resume  # never a false success
    assert done["state"] == "succeeded", done
    assert [e["kind"] for e in done["events"]][-2:] == ["previous_destroyed", "succeeded"]
    assert load.failures == [] and load.versions["v1"] > 0
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v2")
    await assert_settled(api, done, done["units"])  # the old units are gone


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
    assert load.failures == [] and "v2" not in load.versions
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    await assert_settled(api, done, first["units"])  # the live release is intact
