"""Two servers split the probing: each service's instances are probed (and routed, and reaped)
by one server, the one driving its deploy while it runs; a server killed with -9 hands its services to the other within the member
lease's TTL; garbage under the members' prefix takes nothing from anyone; etcd paused, each
server goes on probing what it had."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from faults.conftest import Paused, workloads
from faults.test_two_servers import ENDED, deploy, peer_of
from helpers import eventually
from integration.test_resume import ServerProcess, http, wait_state, wait_up
from integration.test_zero_downtime import wait_serving
from integration.traefik import Traefik

from deployster import etcd as etcd_adapter
from deployster.keys import members_prefix
from deployster.launchers import EtcdServer
from deployster.membership import Member
from deployster.naming import UnitName
from deployster.routers import TraefikRouter
from handlers.owners import HANDOVER_GRACE, MEMBER_TTL, owner

POLICY: dict[str, Any] = {
    "health": {"interval": 0.1, "healthy_threshold": 1, "unhealthy_threshold": 3},
    "min_healthy_time": 1,
    "drain": 0,
    "instance_deadline": 30,
    "deploy_deadline": 60,
}
PROBES = re.compile(r'^deployster_health_probes_total\{service="([^"]+)"\} ([0-9.e+]+)$', re.M)


def traefik_servers(tmp_path: Path, etcd: str, fleet: str, traefik: Traefik) -> list[Any]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ServerProcess(tmp_path / "a", etcd, fleet)
    router = a.flags.index("--router")
    a.flags[router : router + 6] = [
        "--router",
        "traefik",
        "--traefik-root",
        traefik.root_key,
        "--traefik-api",
        traefik.api_url,
    ]
    return [a, peer_of(a, tmp_path / "b")]


def prefix_of(server: ServerProcess) -> str:
    return server.flags[server.flags.index("--etcd-prefix") + 1]


async def probes(session: aiohttp.ClientSession) -> dict[str, float]:
    """Health probes per service this server made so far (its /metrics)."""
    async with session.get("/metrics") as resp:
        assert resp.status == 200
        return {s: float(n) for s, n in PROBES.findall(await resp.text())}


async def probed_in(
    sessions: dict[str, aiohttp.ClientSession], seconds: float
) -> dict[str, dict[str, float]]:
    """Probes per server and service made during the next ``seconds``."""
    before = {name: await probes(s) for name, s in sessions.items()}
    await asyncio.sleep(seconds)
    after = {name: await probes(s) for name, s in sessions.items()}
    return {
        name: {svc: n - before[name].get(svc, 0.0) for svc, n in after[name].items()}
        for name in sessions
    }


@contextlib.asynccontextmanager
async def two_servers(
    tmp_path: Path, etcd: EtcdServer, fleet: str, traefik: Traefik
) -> AsyncIterator[tuple[list[ServerProcess], dict[str, aiohttp.ClientSession], list[str]]]:
    """Servers a and b, started and registered; their sessions; their member ids (a's first)."""
    a, b = servers = traefik_servers(tmp_path, etcd.endpoint, fleet, traefik)
    a.start()
    b.start()
    client = etcd_adapter.client(etcd.endpoint)
    try:
        async with http(a.url) as sa, http(b.url) as sb:
            await wait_up(sa, a)
            await wait_up(sb, b)
            base = members_prefix(prefix_of(a))

            async def both_registered() -> list[Member] | None:
                found = [
                    Member.model_validate_json(kv.value)
                    for kv in await client.get_prefix(base.encode())
                ]
                return found if len(found) == 2 else None

            members = {m.pid: m.id for m in await eventually(both_registered, timeout=10)}
            yield servers, {"a": sa, "b": sb}, [members[a.child.pid], members[b.child.pid]]
    finally:
        await client.close()
        for server in servers:
            server.cleanup()


def services_owned(ids: list[str]) -> tuple[str, str]:
    """A service the first id owns and one the second owns."""
    names = [f"svc-{secrets.token_hex(3)}" for _ in range(40)]
    return (
        next(s for s in names if owner(s, ids) == ids[0]),
        next(s for s in names if owner(s, ids) == ids[1]),
    )


async def deployed(session: aiohttp.ClientSession, service: str, count: int) -> dict[str, Any]:
    async with session.put(f"/v1/services/{service}/policy", json={"policy": POLICY}) as resp:
        assert resp.status == 200, await resp.text()
    started = await deploy(session, service, {"version": "v1", "instance_count": count})
    return await wait_state(session, service, started["id"], ENDED, 60)


async def versions_served(traefik: Traefik, host: str, requests: int) -> set[str]:
    """The versions that answer ``requests`` requests through Traefik."""
    found = set()
    async with aiohttp.ClientSession() as session:
        for _ in range(requests):
            async with session.get(traefik.web_url, headers={"Host": host}) as resp:
                assert resp.status == 200, resp.status
                found.add((await resp.json())["version"])
    return found


async def test_each_service_is_probed_by_one_server_garbage_members_and_etcd_paused(
    tmp_path: Path,
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    fault_traefik: Traefik,
    fault_etcd: Paused,
) -> None:
    async with two_servers(tmp_path, fault_etcd_server, fault_fleet[0], fault_traefik) as (
        servers,
        sessions,
        ids,
    ):
        mine_a, mine_b = services_owned(ids)
        # Each deploy goes through the server that does NOT own the service: it probes the
        # service while it drives the deploy, and stops once the deploy is over.
        done = await asyncio.gather(
            deployed(sessions["b"], mine_a, 2), deployed(sessions["a"], mine_b, 2)
        )
        assert [d["state"] for d in done] == ["succeeded", "succeeded"], done
        await wait_serving(fault_traefik, f"{mine_a}.localhost", "v1")
        await wait_serving(fault_traefik, f"{mine_b}.localhost", "v1")
        await asyncio.sleep(HANDOVER_GRACE + 0.5)  # the deploying servers let go

        counted = await probed_in(sessions, 2.0)
        print(f"\n[owners] probes in 2 s: {counted}")
        # 2 instances, every 0.1 s, by the owner alone.
        assert counted["a"].get(mine_a, 0) >= 20 and counted["b"].get(mine_a, 0) == 0, counted
        assert counted["b"].get(mine_b, 0) >= 20 and counted["a"].get(mine_b, 0) == 0, counted

        # A deploy of mine_a through b again, replacing v1: while b holds the service's lock,
        # a stands back and b alone probes; the v1 instances b retired never come back.
        slow = {**POLICY, "min_healthy_time": 5}
        async with sessions["b"].put(f"/v1/services/{mine_a}/policy", json={"policy": slow}) as r:
            assert r.status == 200, await r.text()
        second = await deploy(
            sessions["b"], mine_a, {"version": "v2", "instance_count": 2, "destroy_previous": True}
        )
        running = await wait_state(sessions["b"], mine_a, second["id"], ("running", *ENDED), 30)
        assert running["state"] == "running", running
        await asyncio.sleep(HANDOVER_GRACE + 0.2)
        counted = await probed_in(sessions, 1.0)
        assert counted["a"].get(mine_a, 0) == 0 and counted["b"].get(mine_a, 0) >= 10, counted
        done = await wait_state(sessions["b"], mine_a, second["id"], ENDED, 60)
        assert done["state"] == "succeeded", done
        await asyncio.sleep(HANDOVER_GRACE + 0.5)  # a takes mine_a back, b lets go
        assert await versions_served(fault_traefik, f"{mine_a}.localhost", 20) == {"v2"}
        counted = await probed_in(sessions, 1.0)
        assert counted["a"].get(mine_a, 0) >= 10 and counted["b"].get(mine_a, 0) == 0, counted
        assert await versions_served(fault_traefik, f"{mine_a}.localhost", 20) == {"v2"}

        # The peer's answer says who probes: not it.
        async with sessions["b"].get("/v1/services") as resp:
            listed = {s["name"]: s["instances"] for s in (await resp.json())["services"]}
        assert len(listed[mine_a]) == len(listed[mine_b]) == 2, listed
        assert all("another server owns" in i["last_probe"] for i in listed[mine_a]), listed
        assert all(i["healthy"] and i["routed"] for i in listed[mine_b]), listed

        # Garbage under the members' prefix, under an id that would own both services if it
        # counted: it is ignored, nothing moves.
        names = (f"ghost-{n}" for n in range(10_000))
        ghost = next(g for g in names if owner(mine_a, [*ids, g]) == owner(mine_b, [*ids, g]) == g)
        client = etcd_adapter.client(fault_etcd_server.endpoint)
        try:
            await client.put(
                f"{members_prefix(prefix_of(servers[0]))}{ghost}".encode(), b"\x00{garbage"
            )
            counted = await probed_in(sessions, 1.5)
            assert counted["a"].get(mine_a, 0) >= 15 and counted["b"].get(mine_b, 0) >= 15, counted
            assert counted["b"].get(mine_a, 0) == counted["a"].get(mine_b, 0) == 0, counted
            for log in (s.log_text() for s in servers):
                assert "member_invalid" in log
        finally:
            await client.close()

        # etcd frozen for 5 s (the member keys live on: a lease is refreshed every 5 s and
        # lasts 15 s): both go on probing what they had, and neither takes the other's
        # services; /metrics needs no etcd.
        async with fault_etcd.paused(1):
            await asyncio.sleep(1)
            counted = await probed_in(sessions, 3.0)
        print(f"[owners] probes in 3 s with etcd paused: {counted}")
        assert counted["a"].get(mine_a, 0) >= 30 and counted["b"].get(mine_b, 0) >= 30, counted
        assert counted["b"].get(mine_a, 0) == counted["a"].get(mine_b, 0) == 0, counted
        counted = await probed_in(sessions, 2.0)  # and after it, as before
        assert counted["b"].get(mine_a, 0) == counted["a"].get(mine_b, 0) == 0, counted
        assert counted["a"].get(mine_a, 0) >= 20 and counted["b"].get(mine_b, 0) >= 20, counted


async def test_a_killed_server_s_instances_are_probed_by_its_peer(
    tmp_path: Path,
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    fault_traefik: Traefik,
) -> None:
    async with two_servers(tmp_path, fault_etcd_server, fault_fleet[0], fault_traefik) as (
        servers,
        sessions,
        ids,
    ):
        a, b = servers
        mine_a, _ = services_owned(ids)
        record = await deployed(sessions["a"], mine_a, 2)
        assert record["state"] == "succeeded", record
        await wait_serving(fault_traefik, f"{mine_a}.localhost", "v1")
        counted = await probed_in(sessions, 1.0)
        assert counted["a"].get(mine_a, 0) >= 10 and counted["b"].get(mine_a, 0) == 0, counted

        # a dies, and right after one of the instances it probed: nobody probes it until b
        # sees a's member key expire; then b finds it dead and takes it out of Traefik.
        victim = UnitName.parse(record["units"][0])
        assert victim is not None
        a.kill()
        killed_at = time.monotonic()
        [pid] = [p for p, unit in workloads(victim.service).items() if unit == str(victim)]
        os.kill(pid, signal.SIGKILL)
        router = TraefikRouter(
            etcd_adapter.client(fault_etcd_server.endpoint),
            root_key=fault_traefik.root_key,
            api_url=fault_traefik.api_url,
        )
        try:
            async with aiohttp.ClientSession() as session:

                async def dead_one_out() -> bool:
                    served = await router.served_urls(mine_a, session)
                    return served is not None and len(served) == 1

                await eventually(dead_one_out, timeout=MEMBER_TTL + 15, interval=0.1)
        finally:
            await router.etcd.close()
        took = time.monotonic() - killed_at
        print(f"\n[owners] the dead instance left Traefik {took:.1f} s after its prober's kill")
        # The member lease's TTL, three failed probes 0.1 s apart and Traefik's reload.
        assert took < MEMBER_TTL + 3, (took, b.log_text())
        assert "probing_moved" in b.log_text()
        counted = await probed_in({"b": sessions["b"]}, 1.0)
        assert counted["b"].get(mine_a, 0) >= 5, counted  # the live instance, by b now
        await wait_serving(fault_traefik, f"{mine_a}.localhost", "v1")


async def test_after_an_etcd_outage_longer_than_the_ttl_the_servers_split_the_work_again(
    tmp_path: Path,
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    fault_traefik: Traefik,
    fault_etcd: Paused,
) -> None:
    """etcd frozen past the member TTL: every key expires when it wakes; both servers kept
    probing their share meanwhile, then write their keys again and split as before."""
    async with two_servers(tmp_path, fault_etcd_server, fault_fleet[0], fault_traefik) as (
        servers,
        sessions,
        ids,
    ):
        mine_a, mine_b = services_owned(ids)
        done = await asyncio.gather(
            deployed(sessions["a"], mine_a, 1), deployed(sessions["b"], mine_b, 1)
        )
        assert [d["state"] for d in done] == ["succeeded", "succeeded"], done
        async with fault_etcd.paused(MEMBER_TTL + 2):
            await asyncio.sleep(1)
            counted = await probed_in(sessions, 2.0)
        assert counted["a"].get(mine_a, 0) >= 10 and counted["b"].get(mine_b, 0) >= 10, counted
        assert counted["b"].get(mine_a, 0) == counted["a"].get(mine_b, 0) == 0, counted

        async def split_again() -> dict[str, dict[str, float]] | None:
            counted = await probed_in(sessions, 1.0)
            alone = counted["b"].get(mine_a, 0) == counted["a"].get(mine_b, 0) == 0
            going = counted["a"].get(mine_a, 0) >= 5 and counted["b"].get(mine_b, 0) >= 5
            return counted if alone and going else None

        resumed = time.monotonic()
        await eventually(split_again, timeout=20, interval=0)
        print(f"\n[owners] split again {time.monotonic() - resumed:.1f} s after etcd woke")
        logs = [s.log_text() for s in servers]
        assert all("member_key_gone" in log for log in logs), logs
        assert all(log.count("member_registered") >= 2 for log in logs)


async def test_a_clean_stop_hands_the_services_over_at_once(
    tmp_path: Path,
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    fault_traefik: Traefik,
) -> None:
    """SIGTERM revokes the member lease: the peer probes the stopped server's services within
    a moment, not after the TTL."""
    async with two_servers(tmp_path, fault_etcd_server, fault_fleet[0], fault_traefik) as (
        servers,
        sessions,
        ids,
    ):
        mine_a, _ = services_owned(ids)
        record = await deployed(sessions["a"], mine_a, 1)
        assert record["state"] == "succeeded", record
        assert (await probes(sessions["b"])).get(mine_a, 0) == 0
        stopped_at = time.monotonic()
        assert servers[0].stop() == 0, servers[0].log_text()

        async def b_probes() -> bool:
            return (await probes(sessions["b"])).get(mine_a, 0) > 0

        await eventually(b_probes, timeout=MEMBER_TTL, interval=0.1)
        took = time.monotonic() - stopped_at
        print(f"\n[owners] the peer probed the stopped server's service {took:.1f} s after SIGTERM")
        assert took < 3, took
