"""Notifications against a real HTTP receiver on loopback, with real etcd and localfleet."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import Received, Receiver, eventually, known_secret
from integration.conftest import FAST_POLICY, Api, running_api

from deployster.launchers import EtcdServer, free_port
from deployster.notify import Delivery, NotifyTarget, headers

SECRET = known_secret("notify-integration-secret")
FAST_RETRIES = (0.2, 0.2, 0.2)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver(free_port())
    await found.start()
    yield found
    if found.hang is not None:
        found.hang.set()
    await found.stop()


def valid(received: Received, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), received.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, received.signature)


async def test_a_deploy_that_succeeds_notifies_start_and_success_signed(
    aiohttp_client, etcd_endpoint: str, localfleet: str, receiver: Receiver
) -> None:  # type: ignore[no-untyped-def]
    async with running_api(
        aiohttp_client,
        etcd_endpoint,
        localfleet,
        notify_url=[receiver.url],
        notify_secret=SECRET,
        public_url="https://deployster.example",
    ) as api:
        done = await api.deployed({"version": "v1", "instance_count": 1})
        assert done["state"] == "succeeded"
        await receiver.received(2)
    assert receiver.events() == ["deploy.started", "deploy.succeeded"]
    assert all(valid(r, SECRET) for r in receiver.got)
    assert len({r.delivery for r in receiver.got}) == 2
    body = receiver.got[1].json
    assert body["event"] == "deploy.succeeded" and body["service"] == api.service
    deploy = body["deploy"]
    assert (deploy["id"], deploy["version"], deploy["state"], deploy["source"]) == (
        done["id"],
        "v1",
        "succeeded",
        "api",
    )
    assert deploy["actor"] == "deployster" and deploy["duration"] > 0
    assert body["link"] == (
        f"https://deployster.example/v1/services/{api.service}/deploys/{done['id']}"
    )


async def test_a_rolled_back_deploy_notifies_its_reason_and_a_wrong_secret_does_not_verify(
    api: Api, receiver: Receiver
) -> None:
    policy = FAST_POLICY.model_copy(
        update={
            "instance_deadline": 2,
            "notify": [
                NotifyTarget(url=receiver.url, secret=SECRET, events=["deploy.rolled_back"])
            ],
        }
    )
    await api.deployster.store.save_policy(api.service, policy)
    done = await api.deployed(
        {"version": "v1", "instance_count": 1, "env": {"DEPLOYSTER_WORKLOAD_HEALTH": "fail"}}
    )
    assert done["state"] == "rolled_back"
    await receiver.received(1)
    [got] = receiver.got  # the target asked for roll-backs only
    assert got.event == "deploy.rolled_back" and valid(got, SECRET)
    assert not valid(got, SECRET + "x")
    assert got.json["deploy"]["reason"] == done["error"] and "not healthy" in done["error"]


async def test_a_receiver_that_fails_once_gets_the_same_delivery_again(
    api: Api, receiver: Receiver
) -> None:
    api.deployster.notifier.schedule = FAST_RETRIES
    receiver.answers = [500]
    await save_notify(api, NotifyTarget(url=receiver.url, events=["deploy.succeeded"]))
    await api.deployed({"version": "v1", "instance_count": 1})
    await receiver.received(2)
    first, second = receiver.got
    assert first.delivery == second.delivery and first.body == second.body
    assert first.signature == "" and second.event == "deploy.succeeded"  # no secret: unsigned

    async def listed() -> list[dict[str, Any]] | None:
        resp = await api.client.get(api.url("/notifications"), headers=api.auth)
        assert resp.status == 200
        found: list[dict[str, Any]] = (await resp.json())["notifications"]
        return found if found and found[0]["outcome"] == "delivered" else None

    [outcome] = await eventually(listed, timeout=10)
    assert (outcome["id"], outcome["attempts"], outcome["status"]) == (first.delivery, 2, 200)
    assert outcome["origin"] == f"http://127.0.0.1:{receiver.port}"  # never the path


async def test_a_receiver_that_hangs_does_not_slow_the_deploy(api: Api, receiver: Receiver) -> None:
    receiver.hang = asyncio.Event()
    await save_notify(api, NotifyTarget(url=receiver.url))
    done = await api.deployed({"version": "v1", "instance_count": 1})
    # The receiver holds deploy.started open for as long as the test runs. Had the deploy
    # waited for it, it would have taken at least the send timeout; it took what a deploy
    # without receivers takes (a few seconds).
    assert done["state"] == "succeeded"
    assert receiver.events()[:1] == ["deploy.started"]
    record = await api.deployster.store.get_deploy(api.service, done["id"])
    assert record is not None and record.finished_at is not None
    took = (record.finished_at - record.created_at).total_seconds()
    assert took < api.deployster.notifier.timeout, took


async def test_a_delivery_pending_at_a_restart_is_delivered_after_it(
    aiohttp_client, etcd_endpoint: str, localfleet: str
) -> None:  # type: ignore[no-untyped-def]
    down = Receiver(free_port())  # nothing listens yet: every attempt is refused
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    async with running_api(
        aiohttp_client, etcd_endpoint, localfleet, prefix=prefix, notify_url=[down.url]
    ) as api:
        api.deployster.notifier.schedule = (0.3,) * 50
        done = await api.deployed({"version": "v1", "instance_count": 1})
        outbox = api.deployster.notifier.outbox

        async def both_tried() -> list[Any] | None:
            # The end of the deploy reaches the notifier on the bus, just after the record.
            found = await outbox.pending()
            events = {d.event for d, _ in found}
            tried = all(d.attempts >= 1 for d, _ in found)
            return found if events == {"deploy.started", "deploy.succeeded"} and tried else None

        pending = await eventually(both_tried, timeout=10)
        ids = {d.id for d, _ in pending}
    await down.start()
    try:
        async with running_api(
            aiohttp_client, etcd_endpoint, localfleet, prefix=prefix, notify_url=[]
        ) as again:
            await down.received(2, timeout=15)
            assert {r.delivery for r in down.got} == ids
            assert down.got[-1].json["deploy"]["id"] == done["id"]
            outbox = again.deployster.notifier.outbox

            async def emptied() -> bool:
                return await outbox.pending() == []

            await eventually(emptied, timeout=5)
    finally:
        await down.stop()


def delivery(receiver: Receiver, service: str, event: str) -> Delivery:
    """A delivery as the notifier queues it, for ``receiver``, due now."""
    delivery_id, body = secrets.token_hex(12), json.dumps({"event": event}).encode()
    return Delivery(
        id=delivery_id,
        event=event,
        service=service,
        url=receiver.url,
        origin=f"http://127.0.0.1:{receiver.port}",
        body=body.decode(),
        headers=headers(event, delivery_id, body, None),
        created_at=time.time(),
        next_at=time.time(),
    )


async def test_a_pending_delivery_waits_out_a_paused_etcd_and_the_watch_goes_on(
    aiohttp_client, private_etcd: EtcdServer, localfleet: str, receiver: Receiver
) -> None:  # type: ignore[no-untyped-def]
    """etcd frozen (SIGSTOP) while a delivery waits for its retry: nothing is sent while its
    claim cannot be written; after etcd is back it is delivered once more with the same id,
    and the sender, which follows the outbox by a watch, still sees new and garbage entries."""
    assert private_etcd.process is not None
    async with running_api(aiohttp_client, private_etcd.endpoint, localfleet) as api:
        notifier = api.deployster.notifier
        notifier.schedule = (0.3,) * 5
        receiver.answers = [500]
        first = delivery(receiver, api.service, "deploy.succeeded")
        await notifier.outbox.add([first])
        await receiver.received(1)
        os.kill(private_etcd.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(3)  # ten retry periods: each needs a claim written first
            assert [r.delivery for r in receiver.got] == [first.id]
        finally:
            os.kill(private_etcd.process.pid, signal.SIGCONT)
        await receiver.received(2, timeout=15)
        assert [r.delivery for r in receiver.got] == [first.id, first.id]

        async def emptied() -> bool:
            return await notifier.outbox.pending() == []

        await eventually(emptied, timeout=10)
        # Garbage in the outbox is left alone; the next delivery still goes out at once.
        garbage = f"{notifier.outbox.pending_prefix}garbage"
        await api.deployster.etcd.put(garbage.encode(), b"{not json")
        listed = await api.client.get(api.url("/notifications"), headers=api.auth)
        assert listed.status == 200, await listed.text()  # the garbage is left out, not a 500
        second = delivery(receiver, api.service, "task.finished")
        started = time.monotonic()
        await notifier.outbox.add([second])
        await receiver.received(3, timeout=5)
        assert receiver.got[2].delivery == second.id and time.monotonic() - started < 2
        assert len(receiver.got) == 3
        await asyncio.sleep(0.5)
        assert len(receiver.got) == 3  # each delivered once
        [(left, _)] = [
            (kv.key, kv.value)
            for kv in await api.deployster.etcd.get_prefix(notifier.outbox.pending_prefix.encode())
        ]
        assert left.decode() == garbage


async def test_the_slack_format_posts_readable_text_and_blocks(
    api: Api, receiver: Receiver
) -> None:
    await save_notify(
        api, NotifyTarget(url=receiver.url, format="slack", events=["deploy.succeeded"])
    )
    await api.deployed({"version": "v7", "instance_count": 1})
    await receiver.received(1)
    body = receiver.got[0].json
    assert set(body) == {"text", "blocks"}
    assert body["text"].startswith(f"✅ *{api.service}* v7 is live")
    assert "*Source:* api" in body["text"]
    assert body["blocks"][0] == {
        "type": "section",
        "text": {"type": "mrkdwn", "text": f"✅ *{api.service}* v7 is live"},
    }


async def test_the_policy_never_shows_a_secret_and_keeps_it_when_sent_back(
    api: Api, receiver: Receiver
) -> None:
    target = {"url": receiver.url, "secret": SECRET, "format": "json"}
    resp = await api.client.put(
        api.url("/policy"), json={"policy": {"notify": [target]}}, headers=api.auth
    )
    assert resp.status == 200, await resp.text()
    shown = (await resp.json())["policy"]
    assert shown["notify"][0]["secret"] == "***" and SECRET not in json.dumps(shown)
    # Written back as read (masked), the secret stays what it was.
    resp = await api.client.put(api.url("/policy"), json={"policy": shown}, headers=api.auth)
    assert resp.status == 200
    stored = await api.deployster.store.get_policy(api.service)
    assert stored.notify[0].secret is not None
    assert stored.notify[0].secret.get_secret_value() == SECRET


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@example.com/",
        "http://",
        "http://exa mple.com/",
        "http://example.com:99999/",
        "x" * 3000,
    ],
)
async def test_receiver_urls_are_validated(api: Api, url: str) -> None:
    resp = await api.client.put(
        api.url("/policy"), json={"policy": {"notify": [{"url": url}]}}, headers=api.auth
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"] == "invalid_request" and "url" in body["description"]


async def save_notify(api: Api, target: NotifyTarget) -> None:
    policy = FAST_POLICY.model_copy(update={"notify": [target]})
    await api.deployster.store.save_policy(api.service, policy)
