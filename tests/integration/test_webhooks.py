"""Webhooks over HTTP against real etcd and localfleet: push → decision → deploy → healthy
and routed, with the providers' sample bodies and signatures."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aioresponses import aioresponses
from helpers import eventually, known_secret
from integration.conftest import FAST_POLICY, Api, running_api
from webhook_samples import (
    REGISTRY_V1,
    REGISTRY_V2,
    dockerhub,
    ghcr,
    ghcr_headers,
    registry,
    registry_event,
    sample_bytes,
)
from yarl import URL

from deployster.etcd import LeaseKeeper
from deployster.naming import UnitName
from deployster.store import DeployRecord, LockHolder
from handlers.webhooks import WebhookHandler

SECRET = known_secret(f"hook-{secrets.token_hex(8)}")
GHCR_SECRET = known_secret(f"gh-{secrets.token_hex(8)}")
CALLBACK = (
    "https://registry.hub.docker.com/u/deployster/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/"
)


@pytest.fixture
async def hooks(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    """Deployster with the webhooks on: one secret for all sources, GHCR's of its own."""
    async with running_api(
        aiohttp_client,
        etcd_endpoint,
        localfleet,
        webhook_secret=SECRET,
        webhook_secret_ghcr=GHCR_SECRET,
    ) as running:
        yield running


def repository(api: Api) -> str:
    """The service's image repository by the convention (the test settings' prefix)."""
    return f"deployster/{api.service}"


async def set_policy(api: Api, service: str | None = None, **auto: Any) -> None:
    body = {
        "policy": {
            **FAST_POLICY.model_dump(mode="json", exclude={"auto_deploy"}),
            "auto_deploy": auto,
        }
    }
    resp = await api.client.put(
        f"/v1/services/{service or api.service}/policy", json=body, headers=api.auth
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["policy"]["auto_deploy"]["enabled"] == auto.get("enabled", False)


async def push_registry(
    api: Api,
    tag: str,
    digest: str | None = None,
    event_id: str | None = None,
    content_type: str = REGISTRY_V1,
) -> list[dict[str, Any]]:
    body = registry(
        registry_event(
            repository(api),
            tag,
            digest or f"sha256:{secrets.token_hex(32)}",
            event_id or secrets.token_hex(8),
        )
    )
    resp = await api.client.post(
        "/v1/webhooks/registry",
        data=body,
        headers={"Content-Type": content_type, "Authorization": f"Bearer {SECRET}"},
    )
    data = await resp.json()
    assert resp.status == 202, data
    return list(data["decisions"])


async def webhook_deploys(api: Api) -> list[DeployRecord]:
    return [
        r
        for r in await api.deployster.store.list_deploys(api.service)
        if r.source.startswith("webhook:")
    ]


async def finished_webhook_deploy(api: Api, count: int = 1, timeout: float = 40) -> DeployRecord:
    async def done() -> DeployRecord | None:
        records = await webhook_deploys(api)
        return records[-1] if len(records) >= count and records[-1].state.finished else None

    return await eventually(done, timeout=timeout, interval=0.1)


async def decisions(api: Api) -> list[dict[str, Any]]:
    resp = await api.client.get("/v1/webhooks/events", headers=api.auth)
    assert resp.status == 200
    return list((await resp.json())["events"])


async def test_a_registry_push_deploys_the_new_version_healthy_and_routed(hooks: Api) -> None:
    api = hooks
    await set_policy(api, enabled=True, policy="minor")
    first = await api.deployed({"version": "v1.0.0", "instance_count": 2})
    assert first["state"] == "succeeded"

    digest = f"sha256:{secrets.token_hex(32)}"
    [decision] = await push_registry(api, "v1.1.0", digest, "evt-1", content_type=REGISTRY_V2)
    assert (decision["decision"], decision["service"], decision["tag"]) == (
        "queued",
        api.service,
        "v1.1.0",
    )
    assert "policy minor takes v1.1.0" in decision["reason"]

    record = await finished_webhook_deploy(api)
    assert (record.state, record.version, record.source) == (
        "succeeded",
        "v1.1.0",
        "webhook:registry",
    )
    assert record.actor == f"event evt-1, digest {digest}"
    assert record.instance_count == 2 and record.destroy_previous  # as many as ran; push default
    assert sorted(await api.units()) == sorted(record.units)  # v1.0.0 is gone
    for unit in record.units:
        instance = api.deployster.instances.get(UnitName.parse(unit))
        assert instance is not None and instance.healthy and instance.routed, unit
    routed = await api.deployster.router.servers(api.service)
    assert sorted(routed.values()) == sorted(
        api.deployster.instances.get(UnitName.parse(u)).url for u in record.units
    )

    # Redelivery, the same image under a new event id, a major bump, a downgrade: all ignored.
    [again] = await push_registry(api, "v1.1.0", digest, "evt-1")
    [same_image] = await push_registry(api, "v1.1.0", digest, "evt-2")
    [major] = await push_registry(api, "v2.0.0")
    [older] = await push_registry(api, "v1.0.5")
    assert [d["decision"] for d in (again, same_image, major, older)] == ["ignored"] * 4
    assert again["reason"] == "event evt-1 was handled already (a redelivery)"
    assert same_image["reason"] == "tag 'v1.1.0' is not newer than the live version 'v1.1.0'"
    assert major["reason"] == "tag 'v2.0.0' changes the major version of 'v1.1.0' (policy minor)"
    assert older["reason"] == "tag 'v1.0.5' is not newer than the live version 'v1.1.0'"

    log = await decisions(api)  # newest first
    assert [(d["decision"], d["tag"]) for d in log[:6]] == [
        ("ignored", "v1.0.5"),
        ("ignored", "v2.0.0"),
        ("ignored", "v1.1.0"),
        ("ignored", "v1.1.0"),
        ("deployed", "v1.1.0"),
        ("queued", "v1.1.0"),
    ]
    assert log[4]["deploy_id"] == record.id
    await asyncio.sleep(0.3)
    assert len(await webhook_deploys(api)) == 1


@pytest.mark.parametrize("source", ["dockerhub", "registry", "harbor", "ghcr", "ghcr-untagged"])
async def test_each_providers_sample_reaches_a_decision(hooks: Api, source: str) -> None:
    """The documented bodies, sent as each provider sends them; the service named by its
    policy's repository override, with auto-deploy off: 202 and the reason."""
    api = hooks
    sent = {
        "dockerhub": (
            f"/v1/webhooks/dockerhub/{SECRET}",
            sample_bytes("dockerhub_push"),
            {"Content-Type": "application/json"},
            "someuser/hello-world",
        ),
        "registry": (
            "/v1/webhooks/registry",
            sample_bytes("registry_push"),
            {"Content-Type": REGISTRY_V1, "Authorization": f"Bearer {SECRET}"},
            "acme/hello",
        ),
        "harbor": (
            "/v1/webhooks/harbor",
            sample_bytes("harbor_push_artifact"),
            {"Content-Type": "application/json", "Authorization": SECRET},
            "proj/repo",
        ),
        "ghcr": (
            "/v1/webhooks/ghcr",
            ghcr("Octo-Org/Hello", "v1.0.0", "sha256:6c62"),
            None,
            "octo-org/hello",
        ),
        "ghcr-untagged": (
            "/v1/webhooks/ghcr",
            sample_bytes("ghcr_package_published"),
            None,
            "codertocat/hello-world",
        ),
    }
    path, body, headers, repo = sent[source]
    if headers is None:
        headers = ghcr_headers(body, GHCR_SECRET, f"delivery-{source}")
    await set_policy(api, repository=repo)
    resp = await api.client.post(path, data=body, headers=headers)  # no basic auth
    data = await resp.json()
    assert resp.status == 202, data
    [decision] = data["decisions"]
    assert decision["decision"] == "ignored" and decision["repository"] == repo
    if source == "ghcr-untagged":
        assert decision["reason"] == "a container version without a tag"
    else:
        assert decision["service"] == api.service
        assert (
            decision["reason"]
            == f"auto-deploy is off for service {api.service!r} (policy auto_deploy.enabled)"
        )
    assert (await decisions(api))[0] == decision


@pytest.mark.parametrize(
    "path,headers,body,status",
    [
        (
            f"/v1/webhooks/dockerhub/wrong-{SECRET}",
            {"Content-Type": "application/json"},
            sample_bytes("dockerhub_push"),
            401,
        ),
        (
            "/v1/webhooks/dockerhub/",
            {"Content-Type": "application/json"},
            sample_bytes("dockerhub_push"),
            401,
        ),
        (
            "/v1/webhooks/registry",
            {"Content-Type": REGISTRY_V1},
            sample_bytes("registry_push"),
            401,
        ),
        (
            "/v1/webhooks/registry",
            {"Content-Type": REGISTRY_V1, "Authorization": f"Bearer {SECRET}x"},
            sample_bytes("registry_push"),
            401,
        ),
        (
            "/v1/webhooks/harbor",
            {"Content-Type": "application/json", "Authorization": GHCR_SECRET},
            sample_bytes("harbor_push_artifact"),
            401,
        ),
        (
            "/v1/webhooks/ghcr",
            {**ghcr_headers(b"{}", SECRET, "d"), "Content-Type": "application/json"},
            ghcr("o/n", "v1", "sha256:1"),
            401,
        ),  # signed with the wrong secret
        (
            "/v1/webhooks/ghcr",
            {"Content-Type": "application/json", "X-GitHub-Event": "package"},
            ghcr("o/n", "v1", "sha256:1"),
            401,
        ),  # not signed
        (
            f"/v1/webhooks/dockerhub/{SECRET}",
            {"Content-Type": "application/json"},
            b'{"push_data": {}}',
            400,
        ),
        (
            "/v1/webhooks/registry",
            {"Content-Type": REGISTRY_V1, "Authorization": f"Bearer {SECRET}"},
            b"{events",
            400,
        ),
        (
            "/v1/webhooks/harbor",
            {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
            b'{"type": "PUSH_ARTIFACT", "event_data": {}}',
            400,
        ),
        ("/v1/webhooks/ghcr", ghcr_headers(b"[1]", GHCR_SECRET, "d"), b"[1]", 400),
        (
            "/v1/webhooks/registry",
            {"Content-Type": "text/plain", "Authorization": f"Bearer {SECRET}"},
            sample_bytes("registry_push"),
            415,
        ),
    ],
)
async def test_bad_secrets_and_bodies_are_refused_and_logged_without_secrets(
    hooks: Api,
    log_lines: list[dict[str, object]],
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    api = hooks
    await set_policy(api, enabled=True, repository="acme/hello")
    resp = await api.client.post(path, data=body, headers=headers)
    data = await resp.json()
    if path == "/v1/webhooks/dockerhub/":  # no token at all: no route, so basic auth applies
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Basic realm="Deployster"'
        return
    assert resp.status == status, data
    assert (
        data["error"]
        == {401: "unauthorized", 400: "invalid_request", 415: "unsupported_media_type"}[status]
    )
    assert "WWW-Authenticate" not in resp.headers
    kept = await decisions(api)
    if status == 401:  # a stranger's request: logged and counted, never among the decisions
        assert kept == []
    else:
        assert (kept[0]["decision"], kept[0]["reason"]) == ("rejected", data["description"])
    assert (
        await webhook_deploys(api) == [] and await api.deployster.store.list_queued_pushes() == []
    )
    assert SECRET not in repr(log_lines) and GHCR_SECRET not in repr(log_lines)
    assert any(
        line["event"] == "webhook_decision" and line["decision"] == "rejected" for line in log_lines
    )


async def test_webhooks_are_off_without_a_secret(
    aiohttp_client,
    etcd_endpoint: str,
    localfleet: str,  # type: ignore[no-untyped-def]
    log_lines: list[dict[str, object]],
) -> None:
    async with running_api(aiohttp_client, etcd_endpoint, localfleet) as api:
        assert any(line["event"] == "webhooks_off" for line in log_lines)
        for path in (
            "/v1/webhooks/dockerhub/anything",
            "/v1/webhooks/registry",
            "/v1/webhooks/harbor",
            "/v1/webhooks/ghcr",
        ):
            resp = await api.client.post(
                path, data=b"{}", headers={"Content-Type": "application/json"}
            )
            assert resp.status == 404, path
            assert (await resp.json())["error"] == "not_found"
        resp = await api.client.get("/v1/webhooks/events")
        assert resp.status == 401  # the decision log is behind basic auth
        resp = await api.client.get("/v1/webhooks/events", headers=api.auth)
        assert await resp.json() == {"enabled": [], "events": []}


async def test_pushes_wait_for_the_running_deploy_and_only_the_latest_deploys(hooks: Api) -> None:
    api = hooks
    # The API's deploy holds the service's lock for at least 2 s (healthy time).
    await set_policy(api, enabled=True, policy="all")
    policy = await api.deployster.store.get_policy(api.service)
    await api.deployster.store.save_policy(
        api.service, policy.model_copy(update={"min_healthy_time": 2.0})
    )
    running = (await api.deploy({"version": "v1.0.0", "instance_count": 1}))["deploy"]

    answers = [
        (await push_registry(api, tag))[0] for tag in ("v1.1.0", "v1.3.0", "v1.2.0", "v1.4.0")
    ]
    assert [a["decision"] for a in answers] == ["queued", "queued", "ignored", "queued"]
    assert answers[2]["reason"] == "the newer version v1.3.0 is queued already"
    assert (await api.deployster.store.locks.holder(api.service)).holder == running["id"]

    record = await finished_webhook_deploy(api, timeout=60)
    assert (record.state, record.version) == ("succeeded", "v1.4.0")
    api_record = await api.deployster.store.get_deploy(api.service, running["id"])
    assert api_record.state == "succeeded"
    assert api_record.finished_at <= record.created_at  # never two deploys of one service at once
    log = await decisions(api)
    superseded = {d["tag"]: d["reason"] for d in log if d["decision"] == "ignored"}
    assert superseded["v1.1.0"] == "superseded by v1.3.0, pushed later"
    assert superseded["v1.3.0"] == "superseded by v1.4.0, pushed later"
    await asyncio.sleep(0.5)
    assert [r.version for r in await webhook_deploys(api)] == ["v1.4.0"]
    assert await api.deployster.store.list_queued_pushes() == []


async def test_a_queued_push_survives_a_restart(hooks: Api) -> None:
    api = hooks
    await set_policy(api, enabled=True, policy="glob:v*")
    # Hold the lock as a running deploy would, so that the push stays queued; then restart.
    keeper = LeaseKeeper(api.deployster.etcd, ttl=15)
    await keeper.grant()
    assert (
        await api.deployster.store.locks.acquire(
            api.service, LockHolder(holder="other", reason="a test", lease=keeper.lease_id)
        )
        is None
    )
    [queued] = await push_registry(api, "v7")
    assert queued["decision"] == "queued"
    await api.deployster.webhooks.close()
    assert len(await api.deployster.store.list_queued_pushes()) == 1
    await keeper.revoke()
    restarted = WebhookHandler(
        api.deployster.bus,
        store=api.deployster.store,
        image_prefix="deployster",
        secrets={"registry": SECRET},
        lock_poll=0.5,
    )
    restarted.register()
    try:
        assert await restarted.start() == 1
        record = await finished_webhook_deploy(api)
        assert (record.state, record.version, record.actor) == (
            "succeeded",
            "v7",
            f"event {queued['event_id']}, digest {queued['digest']}",
        )
        assert await api.deployster.store.list_queued_pushes() == []
        # The same image and tag again (a new event id): the policy would take it, the
        # de-duplication by digest and tag does not.
        [same] = await push_registry(api, "v7", queued["digest"])
        assert same["reason"] == f"v7@{queued['digest']} was taken already in the last 24 h"
    finally:
        await restarted.close()


async def test_dockerhub_push_deploys_and_answers_the_callback(
    hooks: Api, log_lines: list[dict[str, object]]
) -> None:
    api = hooks
    await set_policy(api, enabled=True, policy="exact:latest")
    body = dockerhub(repository(api), "latest", CALLBACK)
    with aioresponses(passthrough=["http://127.0.0.1"]) as mocked:
        mocked.post(CALLBACK, status=200)
        resp = await api.client.post(
            f"/v1/webhooks/dockerhub/{SECRET}",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        assert resp.status == 202
        assert (await resp.json())["decisions"][0]["decision"] == "queued"
        record = await finished_webhook_deploy(api)
        assert (record.state, record.version, record.source) == (
            "succeeded",
            "latest",
            "webhook:dockerhub",
        )

        async def called() -> list[Any]:
            return list(mocked.requests.get(("POST", URL(CALLBACK)), []))

        [call] = await eventually(called)
        assert call.kwargs["json"] == {
            "state": "success",
            "context": "Deployster",
            "description": f"Deployster deployed latest (deploy {record.id}).",
        }

        # The same tag pushed again later (a new image): deployed again; the callback fails,
        # which is logged and changes nothing.
        mocked.post(CALLBACK, status=500)
        body = dockerhub(repository(api), "latest", CALLBACK).replace(b"1417566161", b"1417566999")
        resp = await api.client.post(
            f"/v1/webhooks/dockerhub/{SECRET}",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        assert (await resp.json())["decisions"][0]["decision"] == "queued"
        second = await finished_webhook_deploy(api, count=2)
        assert second.state == "succeeded" and second.id != record.id
        await eventually(lambda: _logged(log_lines, "dockerhub_callback_failed"))
    assert SECRET not in repr(log_lines) and "2141b5bi5i5b02bec211i4eeih0242eg11000a" not in repr(
        log_lines
    )


async def _logged(lines: list[dict[str, object]], event: str) -> bool:
    return any(line["event"] == event for line in lines)


async def test_a_push_whose_deploy_rolls_back_answers_failure(hooks: Api) -> None:
    api = hooks
    body = {
        "policy": {
            **FAST_POLICY.model_dump(mode="json", exclude={"auto_deploy"}),
            "health": {"path": "/not-served", "interval": 0.1, "timeout": 1.0},
            "instance_deadline": 1,
            "auto_deploy": {"enabled": True, "policy": "glob:*"},
        }
    }
    assert (await api.client.put(api.url("/policy"), json=body, headers=api.auth)).status == 200
    with aioresponses(passthrough=["http://127.0.0.1"]) as mocked:
        mocked.post(CALLBACK, status=200)
        resp = await api.client.post(
            f"/v1/webhooks/dockerhub/{SECRET}",
            data=dockerhub(repository(api), "v9", CALLBACK),
            headers={"Content-Type": "application/json"},
        )
        assert (await resp.json())["decisions"][0]["decision"] == "queued"
        record = await finished_webhook_deploy(api)
        assert record.state == "rolled_back"

        async def called() -> list[Any]:
            return list(mocked.requests.get(("POST", URL(CALLBACK)), []))

        [call] = await eventually(called)
        assert call.kwargs["json"]["state"] == "failure"
        assert (
            call.kwargs["json"]["description"] == f"The deploy of v9 failed (deploy {record.id})."
        )
