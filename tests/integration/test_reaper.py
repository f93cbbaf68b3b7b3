"""The reaper on real etcd and localfleet: stale announcements and router servers go, live
instances stay, and the deploy history is pruned."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import eventually
from integration.conftest import Api, running_api

from deployster import keys
from deployster.keys import announce_key
from deployster.naming import UnitName
from deployster.records import DeployRecord, DeployState
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


async def test_a_pass_reads_the_records_of_crowded_services_only(
    reaping_api: Api, log_lines: list[dict[str, object]]
) -> None:
    """The pass counts each service's records by their keys; only a service with more than
    ``keep`` (here 2) has its records read, and pruned. An undecodable record shows which were
    read: reading it logs it."""
    api = reaping_api
    store = api.deployster.store
    crowded, calm = f"{api.service}-crowded", f"{api.service}-calm"
    records = {
        service: [
            DeployRecord(
                id=f"20260101-00000{n}-{service[-6:]}",
                service=service,
                version=f"v{n}",
                timestamp="2026.01.01-00.00.00",
                instance_count=1,
                destroy_previous=False,
                state=DeployState.SUCCEEDED,
                created_at=datetime(2026, 1, 1, 0, 0, n, tzinfo=UTC),
            )
            for n in range(1, count + 1)
        ]
        for service, count in ((crowded, 4), (calm, 1))
    }
    for service, written in records.items():
        for record in written:
            await store.save_deploy(record)
        await api.deployster.etcd.put(
            keys.deploy_key(store.prefix, service, "unreadable").encode(), b"\xff"
        )

    async def pruned() -> bool:
        counts = await store.deploy_counts()  # keys only: reads no record
        return counts[crowded] == 3  # the newest two and the unreadable one

    await eventually(pruned, timeout=10)
    assert (await store.deploy_counts())[calm] == 2
    read = {str(line["key"]) for line in log_lines if line["event"] == "record_unreadable"}
    assert keys.deploy_key(store.prefix, crowded, "unreadable") in read
    assert keys.deploy_key(store.prefix, calm, "unreadable") not in read
    kept = [r.id for r in await store.list_deploys(crowded)]
    assert kept == [r.id for r in records[crowded][2:]]
