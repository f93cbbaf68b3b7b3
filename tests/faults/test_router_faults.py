"""The router under faults: Traefik killed with SIGKILL and started again mid-deploy, and the
router's own path to etcd cut (its adapter raises ``RouterError``). The deploy ends
``succeeded`` once the router is back, Traefik's configuration is complete afterwards, and
no request fails while Traefik runs."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from faults.conftest import Child, EtcdGate, assert_settled
from faults.test_deploy_faults import PACE, step_reached, under_load
from helpers import LogTail, eventually
from integration.conftest import FAST_POLICY, Api
from integration.test_zero_downtime import wait_serving
from integration.traefik import Traefik

from deployster.naming import UnitName
from deployster.routers import TraefikRouter
from deployster.testing.load import Load


async def assert_routes_exactly(api: Api, traefik: Traefik, units: list[str]) -> None:
    """Traefik serves the instances of ``units`` and nothing else, and the router's keys
    say the same."""
    router = api.deployster.router
    assert isinstance(router, TraefikRouter)
    urls = set()
    for unit in units:
        name = UnitName.parse(unit)
        instance = api.deployster.instances.get(name) if name is not None else None
        assert instance is not None, unit
        urls.add(instance.url)
    async with aiohttp.ClientSession() as session:

        async def served() -> set[str] | None:
            found = await router.served_urls(api.service, session)
            return found if found == urls else None

        await eventually(served, timeout=10, interval=0.1)
    assert set((await router.servers(api.service)).values()) == urls


@pytest.mark.parametrize(
    "at",
    ["submitted", "routed"],
    ids=["while the new instances are routed", "during the switch"],
)
async def test_traefik_killed_and_restarted_mid_deploy(
    fault_api: Api, fault_router: tuple[Traefik, Child], at: str
) -> None:
    api = fault_api
    traefik, child = fault_router
    host = f"{api.service}.localhost"
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(traefik, host, "v1")

    before = Load(traefik.web_url, host, pause=PACE)
    running = asyncio.create_task(before.run(clients=3))
    second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
    await step_reached(api, second["id"], at)
    before.stop()
    await running
    # Down longer than the router's confirmation timeout (5 s): the step that waits for
    # Traefik fails and is retried.
    async with child.killed(6):
        pass
    await eventually(lambda: served_at_all(traefik, host), timeout=10, interval=0.1)
    after = Load(traefik.web_url, host, pause=PACE)
    running = asyncio.create_task(after.run(clients=3))
    try:
        done = await api.finished(second["id"], timeout=60)
        await asyncio.sleep(0.3)
    finally:
        after.stop()
        await running
    print(
        f"\n[faults] Traefik killed at {at}: {done['state']}; after the restart {after.ok} "
        f"requests, {len(after.failures)} failed, {dict(after.versions)}"
    )
    assert done["state"] == "succeeded", done
    assert before.failures == [] and after.failures == []
    assert before.versions["v1"] > 0 and after.ok > 0
    await assert_routes_exactly(api, traefik, done["units"])
    await assert_settled(api, done, done["units"])


async def served_at_all(traefik: Traefik, host: str) -> bool:
    """Traefik answers for ``host`` with an instance (it read its configuration again)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(traefik.web_url, headers={"Host": host}) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False


@pytest.mark.parametrize(
    ("at", "min_healthy_time", "kind"),
    [
        ("submitted", 0.0, "instance_routing_retrying"),
        ("instance_healthy", 1.0, "deploy_step_retrying"),
    ],
    ids=["while the new instances are registered", "while the old ones are deregistered"],
)
async def test_a_router_error_is_retried_and_never_kills_a_task(
    fault_api: Api,
    fault_traefik: Traefik,
    router_gate: EtcdGate,
    server_log_tail: LogTail,
    at: str,
    min_healthy_time: float,
    kind: str,
) -> None:
    api = fault_api
    await api.deployster.store.save_policy(
        api.service,
        FAST_POLICY.model_copy(update={"drain": 0.5, "min_healthy_time": min_healthy_time}),
    )
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    seen: dict[str, Any] = {}

    async def router_error_retried() -> bool:
        """The log shows a router error being retried (its sentence names Traefik)."""
        lines = server_log_tail.text().splitlines()
        return any(kind in line and "Traefik" in line for line in lines)

    async def deploy_with_the_router_cut() -> None:
        second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
        # Both new instances routed, when the switch is next.
        await step_reached(api, second["id"], at, count=1 if at == "submitted" else 2)
        # Blocked until a router call failed (etcd's request deadline is 5 s), then open.
        async with router_gate.blocked():
            await eventually(router_error_retried, timeout=30, interval=0.2)
        seen["done"] = await api.finished(second["id"], timeout=60)

    load = await under_load(fault_traefik, api, deploy_with_the_router_cut)
    done = seen["done"]
    assert done["state"] == "succeeded", done
    assert "rolling_back" not in [e["kind"] for e in done["events"]]
    assert load.failures == [] and load.versions["v1"] > 0
    worker = api.deployster.deploys._workers[api.service].task
    assert worker is not None and not worker.done()
    await assert_routes_exactly(api, fault_traefik, done["units"])
    await assert_settled(api, done, done["units"])


async def test_traefik_frozen_during_the_switch_the_old_release_is_destroyed_only_once_unrouted(
    fault_api: Api, fault_router: tuple[Traefik, Child]
) -> None:
    """Traefik frozen (SIGSTOP) for longer than the router's confirmation timeout while the
    old instances leave it: the retried step still waits until Traefik no longer serves
    them before they are destroyed, even without a drain."""
    api = fault_api
    traefik, child = fault_router
    await api.deployster.store.save_policy(api.service, FAST_POLICY.model_copy(update={"drain": 0}))
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    await wait_serving(traefik, f"{api.service}.localhost", "v1")
    seen: dict[str, Any] = {}

    async def deploy_with_traefik_frozen() -> None:
        second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
        router = api.deployster.router
        assert isinstance(router, TraefikRouter)

        async def old_keys_gone() -> bool:
            servers = await router.servers(api.service)
            return len(servers) == 2 and not any("-v1-" in server for server in servers)

        # The switch took the old instances out of Traefik's keys: Traefik freezes before
        # it read that (its throttle is 100 ms).
        await eventually(old_keys_gone, timeout=30, interval=0.01)
        async with child.paused(6):  # requests sent meanwhile wait, and are answered after
            pass
        seen["done"] = await api.finished(second["id"], timeout=60)

    load = await under_load(traefik, api, deploy_with_traefik_frozen)
    done = seen["done"]
    assert done["state"] == "succeeded", done
    assert load.failures == [], load.failures[:5]
    await assert_routes_exactly(api, traefik, done["units"])
    await assert_settled(api, done, done["units"])
