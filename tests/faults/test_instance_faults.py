"""Instances while etcd is away: probing goes on, and a dead instance leaves the router as
soon as the router (whose keys live in etcd) can be written again."""

from __future__ import annotations

import os
import signal
import time

import aiohttp
from faults.conftest import Paused, workloads
from helpers import eventually
from integration.conftest import Api
from integration.test_zero_downtime import wait_serving
from integration.traefik import Traefik

from deployster.naming import UnitName
from deployster.routers import TraefikRouter


async def test_an_instance_dying_while_etcd_is_away_leaves_the_router_once_etcd_is_back(
    fault_api: Api, fault_traefik: Traefik, fault_etcd: Paused
) -> None:
    api = fault_api
    first = await api.deployed({"version": "v1", "instance_count": 3})
    assert first["state"] == "succeeded", first
    await wait_serving(fault_traefik, f"{api.service}.localhost", "v1")
    victim = UnitName.parse(first["units"][0])
    assert victim is not None
    instance = api.deployster.instances.get(victim)
    assert instance is not None and instance.routed
    router = api.deployster.router
    assert isinstance(router, TraefikRouter)

    async with fault_etcd.paused(8):
        [pid] = [p for p, unit in workloads(api.service).items() if unit == str(victim)]
        os.kill(pid, signal.SIGKILL)
    resumed_at = time.monotonic()
    # Probing went on: the instance was found dead while etcd was away.
    assert not instance.healthy

    async with aiohttp.ClientSession() as session:

        async def out_of_traefik() -> bool:
            served = await router.served_urls(api.service, session)
            return served is not None and instance.url not in served and len(served) == 2

        await eventually(out_of_traefik, timeout=20, interval=0.1)
    took = time.monotonic() - resumed_at
    print(f"\n[faults] the dead instance left Traefik {took:.1f} s after etcd came back")
    assert took < 8, took  # one etcd call's timeout (5 s) and Traefik's reload, at most
