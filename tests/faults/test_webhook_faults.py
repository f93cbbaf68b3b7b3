"""Faults where a queued push becomes a deploy: etcd away during the take, a server stalled or
killed between reading the push and starting its deploy, and garbage in the push's slot. Each
ends with the push deployed exactly once (or dropped, for garbage) and its slot empty."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from faults.conftest import Paused
from faults.test_two_servers import peer_of, webhook_peers
from helpers import eventually
from integration.conftest import FAST_POLICY, running_api
from integration.test_resume import ServerProcess, http, wait_up
from integration.test_webhooks import (
    CALLBACK,
    SECRET,
    decisions,
    finished_webhook_deploy,
    push_registry,
    set_policy,
    webhook_deploys,
)
from webhook_samples import REGISTRY_V1, registry, registry_event

from deployster import etcd
from deployster.launchers import EtcdServer
from deployster.records import DeployRecord
from deployster.store import Store

POLICY = {
    "policy": {
        **FAST_POLICY.model_dump(mode="json", exclude={"auto_deploy"}),
        "auto_deploy": {"enabled": True, "policy": "glob:v*"},
    }
}


async def test_etcd_away_while_the_worker_takes_a_queued_push(
    aiohttp_client,  # type: ignore[no-untyped-def]
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    fault_etcd: Paused,
    monkeypatch: pytest.MonkeyPatch,
    log_lines: list[dict[str, object]],
) -> None:
    """etcd stops answering just as the worker sends the transaction that takes the push: the
    worker retries, and the push deploys once, whether etcd applied the first try or not."""
    async with running_api(
        aiohttp_client, fault_etcd_server.endpoint, fault_fleet[0], webhook_secret=SECRET
    ) as api:
        await set_policy(api, enabled=True, policy="glob:v*")
        store = api.deployster.store
        take = store.take_queued_push
        reached = asyncio.Event()

        async def take_while_etcd_is_away(*args: Any, **kwargs: Any) -> bool:
            if not reached.is_set():
                reached.set()
                os.kill(fault_etcd.process.pid, signal.SIGSTOP)
            return await take(*args, **kwargs)

        monkeypatch.setattr(store, "take_queued_push", take_while_etcd_is_away)
        try:
            [queued] = await push_registry(api, "v2")
            assert queued["decision"] == "queued"
            await asyncio.wait_for(reached.wait(), 10)
            await asyncio.sleep(7)  # past the etcd client's 5 s timeout
        finally:
            os.kill(fault_etcd.process.pid, signal.SIGCONT)
        record = await finished_webhook_deploy(api, timeout=60)
        assert (record.state, record.version) == ("succeeded", "v2"), record
        assert any(line["event"] == "deploy_step_retrying" for line in log_lines)
        await asyncio.sleep(0.5)
        assert [r.id for r in await webhook_deploys(api)] == [record.id]
        assert await store.queued_services() == []
        deployed = [d for d in await decisions(api) if d["decision"] == "deployed"]
        assert [(d["tag"], d["deploy_id"]) for d in deployed] == [("v2", record.id)]


async def test_a_server_stalled_between_reading_a_push_and_taking_it_starts_no_second_deploy(
    aiohttp_client,  # type: ignore[no-untyped-def]
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Server a reads the queued push and stalls before its take; server b takes the push and
    deploys it; a's take, at the revision it read, is then refused."""
    async with webhook_peers(aiohttp_client, fault_etcd_server, fault_fleet[0]) as (a, b):
        await set_policy(a, enabled=True, policy="glob:v*")
        take = a.deployster.store.take_queued_push
        reached, release = asyncio.Event(), asyncio.Event()
        refused: list[bool] = []

        async def stalled_take(*args: Any, **kwargs: Any) -> bool:
            if not reached.is_set():
                reached.set()
                await release.wait()
                refused.append(not await take(*args, **kwargs))
                return not refused[-1]
            return await take(*args, **kwargs)

        monkeypatch.setattr(a.deployster.store, "take_queued_push", stalled_take)
        [queued] = await push_registry(a, "v3")
        assert queued["decision"] == "queued"
        await asyncio.wait_for(reached.wait(), 10)

        async def started() -> list[DeployRecord]:
            return await webhook_deploys(b)

        [record] = await eventually(started, timeout=15)  # b's resync found the push
        release.set()
        done = await finished_webhook_deploy(b, timeout=60)
        assert (done.id, done.state, done.version) == (record.id, "succeeded", "v3")
        assert refused == [True]
        await asyncio.sleep(0.5)
        assert [r.id for r in await webhook_deploys(b)] == [record.id]
        assert await b.deployster.store.queued_services() == []
        assert [d["deploy_id"] for d in await decisions(b) if d["decision"] == "deployed"] == [
            record.id
        ]
        assert [d for d in await decisions(a) if d["decision"] == "deployed"] == []


async def test_a_server_killed_between_reading_a_push_and_starting_its_deploy(
    tmp_path: Path,
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    fault_etcd: Paused,
) -> None:
    """kill -9 of the server while its worker is taking a fresh push, with etcd frozen so that
    the worker is caught between reading the push and etcd's answer to the take; a peer started
    afterwards deploys the push exactly once."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ServerProcess(tmp_path / "a", fault_etcd_server.endpoint, fault_fleet[0])
    a.flags += ["--webhook-secret", SECRET]
    b = peer_of(a, tmp_path / "b")
    prefix = a.flags[a.flags.index("--etcd-prefix") + 1]
    service = f"svc-{secrets.token_hex(3)}"
    body = registry(registry_event(f"deployster/{service}", "v4", "sha256:" + "a" * 64, "evt-4"))
    a.start()
    try:
        async with (
            http(a.url) as sa,
            etcd.client(fault_etcd_server.endpoint) as client,
        ):
            store = Store(client, prefix)
            await wait_up(sa, a)
            async with sa.put(f"/v1/services/{service}/policy", json=POLICY) as resp:
                assert resp.status == 200, await resp.text()
            async with sa.post(
                "/v1/webhooks/registry",
                data=body,
                headers={"Content-Type": REGISTRY_V1, "Authorization": f"Bearer {SECRET}"},
            ) as resp:
                answer = await resp.json()
                os.kill(fault_etcd.process.pid, signal.SIGSTOP)
            try:
                assert resp.status == 202 and answer["decisions"][0]["decision"] == "queued"
                await asyncio.sleep(0.3)  # the worker's etcd calls are under way, unanswered
                a.kill()
            finally:
                os.kill(fault_etcd.process.pid, signal.SIGCONT)
            print(
                f"\n[webhook-kill] a took the push before the kill: {'webhook_push_taken' in a.log_text()}"
            )

            b.start()
            async with http(b.url) as sb:
                await wait_up(sb, b)

                async def finished() -> list[DeployRecord]:
                    records = await store.list_deploys(service)
                    return records if records and records[-1].state.finished else []

                records = await eventually(finished, timeout=60, interval=0.2)
                assert [(r.version, r.state, r.source) for r in records] == [
                    ("v4", "succeeded", "webhook:registry")
                ], b.log_text()
                assert records[0].actor == f"event evt-4, digest sha256:{'a' * 64}"
                await asyncio.sleep(1)
                assert len(await store.list_deploys(service)) == 1
                assert await store.queued_services() == []
                with contextlib.suppress(aiohttp.ClientError):
                    async with sb.delete(f"/v1/services/{service}/deploys/v4"):
                        pass
    finally:
        a.cleanup()
        b.cleanup()


async def test_garbage_in_the_queued_key_is_dropped_and_never_blocks_the_service(
    aiohttp_client,  # type: ignore[no-untyped-def]
    fault_etcd_server: EtcdServer,
    fault_fleet: tuple[str, Paused],
    log_lines: list[dict[str, object]],
) -> None:
    async with running_api(
        aiohttp_client, fault_etcd_server.endpoint, fault_fleet[0], webhook_secret=SECRET
    ) as api:
        await set_policy(api, enabled=True, policy="glob:v*")
        store = api.deployster.store
        key = f"{store.prefix}/webhooks/queued/{api.service}".encode()
        other = (
            '{"service": "another", "source": "dockerhub", "repository": "deployster/another", '
            f'"tag": "v1", "event_id": "e", "callback_url": "{CALLBACK}"}}'
        )
        garbage = [b"\xff\x00 not json", b'{"service": 1}', b"[]", other.encode()]
        for value in garbage:
            await store.etcd.put(key, value)
            api.deployster.deploys.wake(api.service)

            async def emptied() -> bool:
                return await store.queued_services() == []

            await eventually(emptied, timeout=10)
        dropped = [line for line in log_lines if line["event"] == "webhook_push_unreadable"]
        assert len(dropped) == len(garbage)
        assert CALLBACK not in repr(log_lines)
        assert await store.list_deploys(api.service) == []

        # Garbage met by a decision is replaced like any queued push.
        await store.etcd.put(key, b"\x00garbage")
        [queued] = await push_registry(api, "v5")
        assert queued["decision"] == "queued"
        record = await finished_webhook_deploy(api)
        assert (record.state, record.version) == ("succeeded", "v5")
        assert await store.queued_services() == []
