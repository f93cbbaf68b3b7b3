"""The server's observed view of fleet on real etcd and localfleet: requests read it per
service and say how old it is; planning and the confirmation of units gone read through to
fleet; fleet unreachable leaves the view as it was and fails a plan with the lock freed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import subprocess
from datetime import datetime

import aetcd
import pytest
from integration.conftest import Api, localfleet_child, running_api

from deployster.etcd import client as connect_etcd
from deployster.fleet import FleetUnavailableError
from deployster.localfleet.store import RegistryStore
from deployster.routers import RouterUnavailableError, TraefikRouter, VulcandRouter

SRV = "web-v1-2026.11.26-12.00.00-1"


def kill(child: subprocess.Popen[bytes]) -> None:
    """kill -9, and wait until it is dead without reaping it (its launcher does that)."""
    child.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)


def kill_orphans(state: pathlib.Path) -> None:
    """The unit processes a killed localfleet left running."""
    store = RegistryStore(state)
    for run in store.runs().values():
        for group in run.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    store.close()


async def units_answer(api: Api) -> tuple[int, dict[str, object]]:
    resp = await api.client.get(api.url("/units"), headers=api.auth)
    return resp.status, await resp.json()


def observed_at(body: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(body["observed_at"]))


async def test_a_unit_destroyed_behind_its_back_stays_in_the_view_until_the_next_pass(
    api: Api,
) -> None:
    (unit,) = (await api.deployed({"version": "v1", "instance_count": 1}))["units"]
    status, body = await units_answer(api)
    assert status == 200
    assert [u["version"] for u in body["units"]] == ["v1"]  # type: ignore[attr-defined]
    first = observed_at(body)

    await api.fleet.destroy_unit(unit)  # fleetctl destroy, say: Deployster is not told
    _, body = await units_answer(api)
    assert len(body["units"]) == 1  # type: ignore[arg-type]
    assert observed_at(body) == first  # the same observation, and it says so
    assert float(body["age"]) >= 0  # type: ignore[arg-type]

    await api.deployster.reaper.reconcile(set())  # the reconcile loop's pass
    _, body = await units_answer(api)
    assert body["units"] == []
    assert observed_at(body) > first


async def test_a_plan_reads_through_to_fleet_not_the_view(api: Api) -> None:
    (old,) = (await api.deployed({"version": "v1", "instance_count": 1}))["units"]
    await api.fleet.destroy_unit(old)  # gone from fleet, still in the view
    assert len((await units_answer(api))[1]["units"]) == 1  # type: ignore[arg-type]

    created = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
    # The view's v1 unit would have been planned as a previous unit to replace; fleet said
    # 404 for it, so the plan saw no release running and the view forgot it.
    assert created["previous_units"] == []
    assert created["destroy_previous"] is False
    record = await api.finished(created["id"])
    assert record["state"] == "succeeded"
    _, body = await units_answer(api)
    assert [u["version"] for u in body["units"]] == ["v2"]  # type: ignore[attr-defined]


async def test_succeeded_waits_for_fleet_to_confirm_the_previous_units_gone(api: Api) -> None:
    first = await api.deployed({"version": "v1", "instance_count": 2})
    second = await api.deployed({"version": "v2", "destroy_previous": True})
    assert second["state"] == "succeeded"
    assert sorted(second["previous_units"]) == sorted(first["units"])
    assert sorted(await api.units()) == sorted(second["units"])  # fleet, listed in full
    _, body = await units_answer(api)
    assert sorted(u["version"] for u in body["units"]) == ["v2", "v2"]  # type: ignore[attr-defined]


async def test_fleet_unreachable_the_view_answers_with_its_age_and_a_plan_fails_freeing_the_lock(
    aiohttp_client, etcd_endpoint: str, tmp_path: pathlib.Path
) -> None:  # type: ignore[no-untyped-def]
    with localfleet_child(tmp_path) as (endpoint, child):
        try:
            async with running_api(aiohttp_client, etcd_endpoint, endpoint) as api:
                await api.deployed({"version": "v1", "instance_count": 1})
                _, fresh = await units_answer(api)
                kill(child)  # fleet's API is gone
                await asyncio.sleep(1.2)
                await stale_view_and_failed_plans(api, fresh)
        finally:
            kill_orphans(tmp_path / "state")


async def stale_view_and_failed_plans(api: Api, fresh: dict[str, object]) -> None:
    status, stale = await units_answer(api)
    assert status == 200
    assert stale["units"] == fresh["units"]
    assert observed_at(stale) == observed_at(fresh)
    assert float(stale["age"]) >= 1.2  # type: ignore[arg-type]
    with pytest.raises(FleetUnavailableError):
        await api.deployster.reaper.reconcile(set())  # the pass cannot refresh it
    assert observed_at((await units_answer(api))[1]) == observed_at(fresh)

    for _ in range(2):  # the second would be a 409 if the first had kept the lock
        resp = await api.client.post(
            api.url("/deploys"), json={"deploy": {"version": "v2"}}, headers=api.auth
        )
        assert resp.status == 502, await resp.text()
        assert "fleet" in (await resp.json())["description"]
        assert await api.deployster.store.locks.holder(api.service) is None


async def test_a_server_that_never_read_fleet_answers_502_for_units(
    aiohttp_client, etcd_endpoint: str, tmp_path: pathlib.Path
) -> None:  # type: ignore[no-untyped-def]
    with localfleet_child(tmp_path) as (endpoint, child):
        async with running_api(aiohttp_client, etcd_endpoint, endpoint) as api:
            kill(child)
            status, body = await units_answer(api)
            assert status == 502
            assert body["error"] == "bad_gateway" and "fleet" in str(body["description"])


# -- every router server in one read ------------------------------------------------------


async def test_vulcand_lists_every_service_s_servers_at_once_and_skips_garbage(
    etcd_client: aetcd.Client,
) -> None:
    router = VulcandRouter(etcd_client, prefix=f"vulcand-view-{id(etcd_client):x}", settle=0)
    for service, port in (("web", 31001), ("web2", 31002), ("api", 31003)):
        await router.ensure_service(service)
        await router.register(service, SRV, f"http://127.0.0.1:{port}")
    garbage = router.server_key("api", "broken-1")
    await etcd_client.put(garbage.encode(), b"{not json")
    await etcd_client.put(f"{router.prefix}/backends/stray/servers/x".encode(), b"{}")
    listed = await router.all_server_ids()
    # From the keys alone: the server whose value is garbage is one too (for the reaper to
    # remove when no announcement stands behind it); the stray backend is not vulcand's.
    assert listed == {"web": {SRV}, "web2": {SRV}, "api": {SRV, "broken-1"}}
    for service in ("web", "web2"):
        assert listed[service] == set(await router.servers(service))


async def test_traefik_lists_every_service_s_servers_at_once(etcd_client: aetcd.Client) -> None:
    root = f"traefik-view-{id(etcd_client):x}"
    router = TraefikRouter(etcd_client, root_key=root, bookkeeping_prefix=f"/book-{root}")
    await router.register("web", SRV, "http://127.0.0.1:32001")
    await router.register("web", "web-v1-2026.11.26-12.00.00-10", "http://127.0.0.1:32010")
    await router.register("api", SRV, "http://127.0.0.1:32002")
    # A server Traefik has but the bookkeeping does not, and a key that is no server.
    await etcd_client.put(f"{root}/http/services/api/loadbalancer/servers/9/url".encode(), b"u")
    await etcd_client.put(f"{root}/http/services/api/loadbalancer/servers/x/url".encode(), b"u")
    listed = await router.all_server_ids()
    assert set(listed) == {"web", "api"}
    for service in listed:
        assert listed[service] == set(await router.servers(service))
    assert "#9" in listed["api"]


async def test_all_servers_of_an_unreachable_etcd_is_a_temporary_router_error(
    private_etcd,  # type: ignore[no-untyped-def]
) -> None:
    async with connect_etcd(private_etcd.endpoint, timeout=2) as etcd:
        router = VulcandRouter(etcd, prefix="vulcand", settle=0)
        await router.register("web", SRV, "http://127.0.0.1:31001")
        private_etcd.stop()
        with pytest.raises(RouterUnavailableError, match="Could not read vulcand's servers"):
            await router.all_server_ids()
