"""The instances handler's probe scheduler against real etcd and real HTTP targets: a target
that hangs or answers garbage holds up no other instance, probing goes on while etcd is
frozen, a probe that crashes is logged and its instance probed afresh, and a deploy's claim
moves the probing of its service alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aetcd
from aiohttp import web
from helpers import eventually

from deployster import etcd
from deployster.bus import EventBus
from deployster.keys import announce_key, members_prefix, policy_key
from deployster.launchers import EtcdServer, free_port
from deployster.membership import Member, Membership
from deployster.naming import UnitName
from deployster.policy import HealthPolicy, ServicePolicy
from deployster.routers import RouterUnavailableError, VulcandRouter
from deployster.store import Store
from deployster.units import Announcement
from handlers.instances import InstancesHandler
from handlers.owners import HANDOVER_GRACE, Owners, owner

FAST = HealthPolicy(interval=0.1, timeout=0.5, healthy_threshold=1, unhealthy_threshold=1)


@dataclass
class Probing:
    handler: InstancesHandler
    client: aetcd.Client
    router: VulcandRouter
    prefix: str

    async def announce(self, unit: UnitName, url: str) -> None:
        value = Announcement(url=url, machine="m", unit=str(unit)).model_dump_json()
        await self.client.put(announce_key(self.prefix, unit).encode(), value.encode())

    async def policy(self, service: str, value: str) -> None:
        await self.client.put(policy_key(self.prefix, service).encode(), value.encode())


@contextlib.asynccontextmanager
async def probing(endpoint: str, timeout: float = 5.0, **options: Any) -> AsyncIterator[Probing]:
    """An instances handler on a prefix of its own, routing through vulcand's keys."""
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    async with etcd.client(endpoint, timeout=timeout) as client:
        router = VulcandRouter(client, prefix=f"vulcand-{secrets.token_hex(4)}", settle=0)
        handler = InstancesHandler(
            EventBus(),
            etcd=client,
            store=Store(client, prefix),
            router=router,
            prefix=prefix,
            **options,
        )
        await handler.start()
        try:
            yield Probing(handler, client, router, prefix)
        finally:
            await handler.close()


@dataclass
class Target:
    url: str
    hits: int = 0


@contextlib.asynccontextmanager
async def healthy_target() -> AsyncIterator[tuple[Target, web.AppRunner]]:
    """An HTTP server answering 200 on /health, counting the requests."""
    app = web.Application()
    runner = web.AppRunner(app, access_log=None)
    target = Target("")

    async def health(_: web.Request) -> web.Response:
        target.hits += 1
        return web.Response(text="ok")

    app.router.add_get("/health", health)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    target.url = f"http://127.0.0.1:{port}"
    try:
        yield target, runner
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_target(answer: bytes | None) -> AsyncIterator[str]:
    """A TCP server that reads the request and writes ``answer`` (garbage) and closes, or,
    with None, never answers."""
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        if answer is None:
            await release.wait()
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        release.set()
        server.close()
        await server.wait_closed()


def unit(service: str, n: int) -> UnitName:
    return UnitName(service, "v1", "2026.12.02-00.00.00", n)


async def test_hanging_and_garbage_targets_hold_up_no_other_instance(
    etcd_endpoint: str, log_lines: list[dict[str, object]]
) -> None:
    # Two probes in flight at most, and three targets that never answer in time: the healthy
    # instance is still probed every time a slot frees.
    async with (
        probing(etcd_endpoint, max_in_flight=2) as p,
        raw_target(None) as hanging,
        raw_target(b"\x00\xffnot http at all\r\n\r\n") as garbage,
        healthy_target() as (good, _),
    ):
        service = f"svc-{secrets.token_hex(3)}"
        await p.policy(service, ServicePolicy(health=FAST).model_dump_json())
        for n in (1, 2, 3):
            await p.announce(unit(service, n), hanging)
        await p.announce(unit(service, 4), garbage)
        await p.announce(unit(service, 5), good.url)

        async def routed() -> dict[str, str] | None:
            servers = await p.router.servers(service)
            return servers if unit(service, 5).container in servers else None

        assert await eventually(routed, timeout=10) == {unit(service, 5).container: good.url}
        before = good.hits
        await asyncio.sleep(2.0)
        # Three hanging probes of 0.5 s on two slots: about one slot in three is free for
        # the other two instances, each probed at least every 0.1 s when it has one.
        assert good.hits - before >= 3, good.hits - before
        hung = p.handler.get(unit(service, 1))
        bad = p.handler.get(unit(service, 4))
        assert hung is not None and hung.last_probe is not None
        assert hung.last_probe.detail == "timed out after 0.5 s"
        assert bad is not None and bad.last_probe is not None and not bad.last_probe.ok
        assert not (hung.healthy or hung.routed or bad.healthy or bad.routed)
        assert set(await p.router.servers(service)) == {unit(service, 5).container}
    assert not [line for line in log_lines if line["event"] == "task_crashed"]


async def test_probing_goes_on_while_etcd_is_frozen_or_down(private_etcd: EtcdServer) -> None:
    async with (
        probing(private_etcd.endpoint, timeout=2) as p,
        healthy_target() as (stays, _),
        healthy_target() as (dies, dying),
    ):
        service = f"svc-{secrets.token_hex(3)}"
        await p.policy(service, ServicePolicy(health=FAST).model_dump_json())
        await p.announce(unit(service, 1), stays.url)
        await p.announce(unit(service, 2), dies.url)

        async def both_routed() -> bool:
            return len(await p.router.servers(service)) == 2

        await eventually(both_routed, timeout=10)
        victim = p.handler.get(unit(service, 2))
        assert victim is not None
        os.kill(private_etcd.process.pid, signal.SIGSTOP)
        try:
            before = stays.hits
            await asyncio.sleep(1.0)
            assert stays.hits - before >= 5, stays.hits - before  # every 0.1 s, etcd or not
        finally:
            os.kill(private_etcd.process.pid, signal.SIGCONT)
        private_etcd.stop()
        before = stays.hits
        await dying.cleanup()  # connection refused from now on
        await asyncio.sleep(2.0)
        assert stays.hits - before >= 10, stays.hits - before
        assert not victim.healthy and victim.last_probe is not None
        assert victim.last_probe.detail == "connection refused"
        private_etcd.start()
        private_etcd.wait_ready()

        # The deregistration that failed meanwhile is retried after the next probes.
        async def dead_one_out() -> bool:
            try:
                servers = await p.router.servers(service)
            except RouterUnavailableError:
                return False  # the client is still reconnecting
            return set(servers) == {unit(service, 1).container}

        await eventually(dead_one_out, timeout=15)


async def test_a_crashed_probe_is_logged_and_its_instance_probed_afresh(
    etcd_endpoint: str, log_lines: list[dict[str, object]]
) -> None:
    async with probing(etcd_endpoint) as p, healthy_target() as (good, _):
        service = f"svc-{secrets.token_hex(3)}"
        await p.policy(service, "}{ garbage, no policy")
        await p.announce(unit(service, 1), good.url)

        def crashes() -> list[dict[str, object]]:
            return [line for line in log_lines if line["event"] == "task_crashed"]

        async def crashed_twice() -> bool:
            return len(crashes()) >= 2

        await eventually(crashed_twice, timeout=5)
        assert crashes()[0]["task"] == f"probe:{unit(service, 1)}"
        assert [c["restart_in"] for c in crashes()[:2]] == [0.2, 0.4]  # the backoff doubles
        assert good.hits == 0 and not await p.router.servers(service)
        # A valid policy: the next attempt reads it and the instance is routed.
        await p.policy(service, ServicePolicy(health=FAST).model_dump_json())

        async def routed() -> bool:
            return unit(service, 1).container in await p.router.servers(service)

        await eventually(routed, timeout=10)
        assert good.hits >= 1


async def test_a_claim_moves_the_probing_of_its_service_alone(etcd_endpoint: str) -> None:
    me, peer = "host-a-1-aaaaaa", "host-b-2-bbbbbb"
    # Never connected: the members are fed through the watch's callback.
    offline = etcd.client("http://127.0.0.1:9")
    membership = Membership(offline, "/p", ttl=5, server_id=me)
    owners = Owners(membership, offline, "/p/locks")
    names = [f"svc-{secrets.token_hex(3)}" for _ in range(40)]
    theirs = [s for s in names if owner(s, [me, peer]) == peer][:2]
    mine = next(s for s in names if owner(s, [me, peer]) == me)
    peer_value = Member(id=peer, host="h", pid=1, version="0", started=0.0).model_dump_json()
    await membership._on_resync({f"{members_prefix('/p')}{peer}": peer_value}, 1)
    assert membership.members == {me, peer}
    async with probing(etcd_endpoint, owners=owners) as p, healthy_target() as (good, _):
        for service in (*theirs, mine):
            await p.policy(service, ServicePolicy(health=FAST).model_dump_json())
            await p.announce(unit(service, 1), good.url)

        async def mine_probed() -> bool:
            found = p.handler.get(unit(mine, 1))
            return found is not None and found.last_probe is not None

        await eventually(mine_probed, timeout=10)
        for service in theirs:
            found = p.handler.get(unit(service, 1))
            assert found is not None and not found.probed
            assert "another server owns" in found.describe_last_probe()

        claimed, other = theirs
        p.handler.claim(claimed)
        instance, untouched = p.handler.get(unit(claimed, 1)), p.handler.get(unit(other, 1))
        assert instance is not None and untouched is not None
        assert instance.probed and not untouched.probed  # at once, and that service alone

        async def claimed_routed() -> bool:
            return unit(claimed, 1).container in await p.router.servers(claimed)

        await eventually(claimed_routed, timeout=10)
        p.handler.release(claimed)
        assert instance.probed  # probed on for the grace, in case the change is undone
        await asyncio.sleep(HANDOVER_GRACE + 0.2)
        assert not instance.probed and not instance.routed and instance.last_probe is None
        # The router is left as it is: the owner carries on from what it probes.
        assert unit(claimed, 1).container in await p.router.servers(claimed)
        assert p.handler.owned_services() == 1
