"""Two servers on one etcd and one fleet: concurrent deploys through both, one owner per
deploy, and a server killed mid-deploy whose deploy the other finishes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from faults.conftest import Child
from integration.conftest import Api, running_api
from integration.test_resume import (
    SLOW_POLICY,
    ServerProcess,
    get_record,
    http,
    unit_names,
    wait_state,
    wait_up,
)
from integration.test_webhooks import (
    SECRET,
    decisions,
    finished_webhook_deploy,
    push_registry,
    set_policy,
    webhook_deploys,
)

from deployster.launchers import EtcdServer
from deployster.store import LOCK_TTL
from handlers.deploys import RESYNC

ENDED = ("succeeded", "failed", "rolled_back")


def peer_of(server: ServerProcess, log_dir: Path) -> ServerProcess:
    """A second server with the same etcd prefix, fleet and router: a peer."""
    peer = ServerProcess(log_dir, "", "")
    flags = list(server.flags)
    flags[flags.index("--listen") + 1] = f"127.0.0.1:{peer.port}"
    peer.flags = flags
    return peer


async def deploy(
    session: aiohttp.ClientSession, service: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with session.post(f"/v1/services/{service}/deploys", json={"deploy": body}) as resp:
        data = await resp.json()
        assert resp.status in (201, 202), data
        return dict(data["deploy"])


async def test_a_peer_finishes_the_deploy_of_a_killed_server(
    tmp_path: Path, fault_etcd_server: EtcdServer, fault_fleet: tuple[str, Child]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ServerProcess(tmp_path / "a", fault_etcd_server.endpoint, fault_fleet[0])
    b = peer_of(a, tmp_path / "b")
    one, two = f"svc-{secrets.token_hex(3)}", f"svc-{secrets.token_hex(3)}"
    a.start()
    b.start()
    try:
        async with http(a.url) as sa, http(b.url) as sb:
            await wait_up(sa, a)
            await wait_up(sb, b)
            for service in (one, two):
                async with sa.put(
                    f"/v1/services/{service}/policy", json={"policy": SLOW_POLICY}
                ) as resp:
                    assert resp.status == 200, await resp.text()

            # Concurrent deploys, one through each server; neither server adopts the other's.
            first, other = await asyncio.gather(
                deploy(sa, one, {"version": "v1", "instance_count": 2}),
                deploy(sb, two, {"version": "v1"}),
            )
            first, other = await asyncio.gather(
                wait_state(sb, one, first["id"], ENDED, 60),
                wait_state(sa, two, other["id"], ENDED, 60),
            )
            assert first["state"] == other["state"] == "succeeded", (first, other)
            for record in (first, other):
                assert "resumed" not in [e["kind"] for e in record["events"]], record

            # Server a dies while its deploy waits (min_healthy_time 3 s): b takes it over
            # once a's lock lease is gone, and finishes it.
            second = await deploy(sa, one, {"version": "v2", "destroy_previous": True})
            running = await wait_state(sa, one, second["id"], ("running", *ENDED), 30)
            assert running["state"] == "running", running
            a.kill()
            killed_at = time.monotonic()
            done = await wait_state(sb, one, second["id"], ENDED, LOCK_TTL + 45)
            took = time.monotonic() - killed_at
            print(f"\n[two-servers] the peer finished the deploy {took:.1f} s after the kill")
            assert done["state"] == "succeeded", (done, b.log_text())
            assert took < LOCK_TTL + RESYNC + 10, took  # the lock's TTL plus one pass (and slack)
            kinds = [e["kind"] for e in done["events"]]
            assert kinds.count("resumed") == 1, kinds
            assert await unit_names(sb, one) == sorted(done["units"])
            assert (await get_record(sb, one, second["id"]))["step"] == "done"
            assert "deploy_resumed" in b.log_text()
            for service, version in ((one, "v2"), (two, "v1")):
                with contextlib.suppress(Exception):
                    async with sb.delete(f"/v1/services/{service}/deploys/{version}"):
                        pass
    finally:
        a.cleanup()
        b.cleanup()


@contextlib.asynccontextmanager
async def webhook_peers(
    aiohttp_client: Any, etcd: EtcdServer, fleet: str
) -> AsyncIterator[tuple[Api, Api]]:
    """Two in-process servers with webhooks on, one etcd prefix, and one service between them."""
    prefix = f"/deployster-peers-{secrets.token_hex(4)}"
    common = {"prefix": prefix, "webhook_secret": SECRET, "vulcand_prefix": f"v-{prefix[1:]}"}
    async with (
        running_api(aiohttp_client, etcd.endpoint, fleet, **common) as a,
        running_api(aiohttp_client, etcd.endpoint, fleet, **common) as b,
    ):
        b.service = a.service
        yield a, b


async def test_the_latest_push_wins_across_servers(
    aiohttp_client,  # type: ignore[no-untyped-def]
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Child],
) -> None:
    """A push queued on one server and a later one on the other: only the later deploys."""
    async with webhook_peers(aiohttp_client, fault_etcd_server, fault_fleet[0]) as (a, b):
        await set_policy(a, enabled=True, policy="all")
        policy = await a.deployster.store.get_policy(a.service)
        await a.deployster.store.save_policy(
            a.service, policy.model_copy(update={"min_healthy_time": 2.0})
        )
        running = (await a.deploy({"version": "v1.0.0"}))["deploy"]  # holds the lock 2 s
        [first] = await push_registry(a, "v1.1.0")
        [later] = await push_registry(b, "v1.2.0")
        assert first["decision"] == later["decision"] == "queued", (first, later)

        record = await finished_webhook_deploy(a, timeout=60)
        assert (record.state, record.version) == ("succeeded", "v1.2.0"), record
        assert (await a.finished(running["id"]))["state"] == "succeeded"
        await asyncio.sleep(RESYNC + 1)  # both servers' workers looked at the service again
        assert [r.version for r in await webhook_deploys(a)] == ["v1.2.0"]
        # The server that queued the later push replaced the earlier one and says so.
        dropped = [d for d in await decisions(b) if d["tag"] == "v1.1.0"]
        assert [(d["decision"], d["reason"]) for d in dropped] == [
            ("ignored", "superseded by v1.2.0, pushed later")
        ]
        deployed = [
            d for d in await decisions(a) + await decisions(b) if d["decision"] == "deployed"
        ]
        assert [(d["tag"], d["deploy_id"]) for d in deployed] == [("v1.2.0", record.id)]
        assert await a.deployster.store.queued_services() == []


async def test_a_clean_stop_hands_the_deploy_over_at_once(
    tmp_path: Path, fault_etcd_server: EtcdServer, fault_fleet: tuple[str, Child]
) -> None:
    """SIGTERM mid-deploy revokes the lock's lease: the next start resumes the deploy without
    waiting for the lease to expire."""
    server = ServerProcess(tmp_path, fault_etcd_server.endpoint, fault_fleet[0])
    service = f"svc-{secrets.token_hex(3)}"
    server.start()
    try:
        async with http(server.url) as session:
            await wait_up(session, server)
            slow = {**SLOW_POLICY, "min_healthy_time": 4}
            async with session.put(f"/v1/services/{service}/policy", json={"policy": slow}) as resp:
                assert resp.status == 200, await resp.text()
            started = await deploy(session, service, {"version": "v1", "instance_count": 1})
            running = await wait_state(session, service, started["id"], ("running", *ENDED), 30)
            assert running["state"] == "running", running
            assert server.stop() == 0, server.log_text()
            stopped_at = time.monotonic()
            server.start()
            await wait_up(session, server)
            done = await wait_state(session, service, started["id"], ENDED, 60)
            took = time.monotonic() - stopped_at
            print(f"\n[clean-stop] the deploy ended {took:.1f} s after the stop")
            assert done["state"] == "succeeded", (done, server.log_text())
            assert took < LOCK_TTL, took  # not the lease's expiry: it was handed over
            assert [e["kind"] for e in done["events"]].count("resumed") == 1
            with contextlib.suppress(Exception):
                async with session.delete(f"/v1/services/{service}/deploys/v1"):
                    pass
    finally:
        server.cleanup()
