"""The reaper on real etcd and localfleet: stale announcements and router servers go, live
instances stay, and the deploy history is pruned."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import eventually
from integration.conftest import Api, running_api

from deployster.keys import announce_key
from deployster.naming import UnitName
from deployster.units import Announcement


@pytest.fixture
async def reaping_api(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    async with running_api(
        aiohttp_client, etcd_endpoint, localfleet, reconcile_interval=0.5, history=2
    ) as running:
        yield running


@pytest.fixture
async def healthy_server() -> AsyncIterator[str]:
    """Something that answers health checks, standing in for an instance fleet no longer has."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_an_announcement_without_its_unit_is_removed_and_deregistered(
    reaping_api: Api, healthy_server: str
) -> None:
    api = reaping_api
    await api.deployed({"version": "v1"})
    live_units = await api.units()
    machine = (await api.fleet.list_machines())[0].id
    ghost = UnitName(api.service, "v0", "2026.01.01-00.00.00", 1)
    key = announce_key(api.deployster.settings.etcd_prefix, ghost)
    value = Announcement(url=healthy_server, machine=machine, unit=str(ghost)).model_dump_json()
    await api.deployster.etcd.put(key.encode(), value.encode())
    router = api.deployster.router

    async def routed() -> bool:
        return ghost.container in await router.servers(api.service)

    await eventually(routed, timeout=5, interval=0.02)  # probed healthy and routed: the harm

    async def reaped() -> bool:
        return (await api.deployster.etcd.get(key.encode())) is None and not await routed()

    await eventually(reaped, timeout=10)
    # The live release's instances were left alone.
    assert await api.units() == live_units
    servers = await router.servers(api.service)
    assert sorted(servers) == sorted(UnitName.parse(u).container for u in live_units)  # type: ignore[union-attr]


async def test_a_router_server_without_an_instance_is_deregistered(
    reaping_api: Api, healthy_server: str
) -> None:
    api = reaping_api
    await api.deployed({"version": "v1"})
    router = api.deployster.router
    await router.register(api.service, "orphan-1", healthy_server)

    async def gone() -> bool:
        return "orphan-1" not in await router.servers(api.service)

    await eventually(gone, timeout=10)
    assert len(await router.servers(api.service)) == 1


async def test_history_keeps_the_newest_deploys(reaping_api: Api) -> None:
    api = reaping_api
    ids = [
        (await api.deployed({"version": f"v{n}", "destroy_previous": True}))["id"]
        for n in range(1, 5)
    ]

    async def pruned() -> list[str]:
        resp = await api.client.get(api.url("/deploys"), headers=api.auth)
        listed = [d["id"] for d in (await resp.json())["deploys"]]
        return listed if len(listed) == 2 else []

    assert await eventually(pruned, timeout=5) == [ids[3], ids[2]]
