"""Version cycles through the real Traefik under continuous load: not one request may fail."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from integration.conftest import FAST_POLICY, Api
from integration.traefik import Traefik

from deployster.policy import HealthPolicy


@dataclass
class Load:
    """Clients that keep requesting the service through Traefik until stopped."""

    url: str
    host: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    versions: Counter[str] = field(default_factory=Counter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    pause: float = 0.0  # seconds each client waits between two requests

    async def client(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.pause)
            try:
                async with session.get(self.url, headers={"Host": self.host}) as resp:
                    body = await resp.json(content_type=None) if resp.status == 200 else None
                    if resp.status == 200:
                        self.ok += 1
                        self.versions[body["version"]] += 1
                    else:
                        self.failures.append(f"HTTP {resp.status}")
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                self.failures.append(repr(exc))

    async def run(self, clients: int) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self.client(session) for _ in range(clients)))

    def stop(self) -> None:
        self._stop.set()


async def wait_serving(traefik: Traefik, host: str, version: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(traefik.web_url, headers={"Host": host}) as resp:
                    if resp.status == 200 and (await resp.json())["version"] == version:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{host} does not serve {version} through Traefik")


async def test_version_cycle_and_rollback_under_load(traefik_api: Api, traefik: Traefik) -> None:
    api = traefik_api
    host = f"{api.service}.localhost"
    # A little drain lets requests already sent to an old instance finish.
    await api.deployster.store.save_policy(
        api.service, FAST_POLICY.model_copy(update={"drain": 0.5})
    )
    first = await api.deployed({"version": "v1", "instance_count": 3})
    assert first["state"] == "succeeded", first
    await wait_serving(traefik, host, "v1")

    load = Load(traefik.web_url, host)
    running = asyncio.create_task(load.run(clients=8))
    try:
        await asyncio.sleep(0.5)
        second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
        done = await api.finished(second["id"])
        assert done["state"] == "succeeded", done
        assert sorted(await api.units()) == sorted(second["units"])  # the old units are gone
        await asyncio.sleep(0.5)

        # A version that never turns healthy is rolled back; v2 keeps serving throughout. The
        # deadline leaves a loaded machine time to start the instances, so the probes see 503s.
        await api.deployster.store.save_policy(
            api.service,
            FAST_POLICY.model_copy(
                update={
                    "instance_deadline": 8,
                    "health": HealthPolicy(interval=0.1, healthy_threshold=1),
                }
            ),
        )
        rolled = await api.deployed(
            {
                "version": "v3",
                "destroy_previous": True,
                "env": {"DEPLOYSTER_WORKLOAD_HEALTH": "fail"},
            }
        )
        assert rolled["state"] == "rolled_back", rolled
        assert "not healthy" in rolled["error"] and "HTTP 503" in rolled["error"]
        await asyncio.sleep(0.5)
    finally:
        load.stop()
        await running
    print(
        f"\n[zero-downtime] {load.ok} requests, {len(load.failures)} failed, versions {dict(load.versions)}"
    )
    assert load.failures == []
    assert load.ok > 200
    assert load.versions["v1"] > 0 and load.versions["v2"] > 0 and "v3" not in load.versions
    assert sorted(await api.units()) == sorted(second["units"])
