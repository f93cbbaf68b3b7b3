"""Secrets never reach the log: each error path is provoked with secrets in scope (the API
password in the auth middleware, webhook secrets, a deploy's and a task's env values) and the
server's log, rendered by the production pipeline, is searched for them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseRunner, TestServer
from helpers import (
    ENV_SECRET,
    KNOWN_SECRETS,
    PASSWORD,
    WEBHOOK_SECRET,
    LogTail,
    eventually,
    leaked_secrets,
)
from integration.conftest import FAST_POLICY, Api, running_api

from deployster.launchers import free_port
from deployster.logs import AccessLogger
from deployster.records import DeployRecord

REGISTRY_V1 = "application/vnd.docker.distribution.events.v1+json"


def assert_no_secret(text: str) -> None:
    """Neither a secret nor its first or last ten characters (a quote cut short)."""
    for secret in (PASSWORD, WEBHOOK_SECRET, ENV_SECRET):
        for part in (secret, secret[:10], secret[-10:]):
            assert part not in text, f"{part!r} of {secret!r} is in the log:\n{text}"


async def logged(tail: LogTail, *needles: str) -> str:
    """The log since the test began, once it holds every needle."""

    async def found() -> str:
        text = tail.text()
        return text if all(n in text for n in needles) else ""

    return await eventually(found, timeout=20)


@pytest.fixture
async def fake_docker() -> AsyncIterator[str]:
    """A Docker endpoint that answers every call with 200 and an empty JSON list."""

    async def garbage(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response([])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


class ProductionServer(TestServer):
    """The app served as ``deployster serve`` serves it: a handler is not cancelled when its
    client goes away (the test server's default), and the access log is on."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs.update(handler_cancellation=False, access_log_class=AccessLogger)
        return await super()._make_runner(**kwargs)


@pytest.fixture
async def api(
    aiohttp_client, etcd_endpoint: str, localfleet: str, fake_docker: str
) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    """Deployster with webhooks on and a Docker endpoint that answers garbage."""
    async with running_api(
        lambda app: aiohttp_client(ProductionServer(app)),
        etcd_endpoint,
        localfleet,
        webhook_secret=WEBHOOK_SECRET,
        docker_endpoint=fake_docker,
    ) as running:
        yield running


async def drop_mid_body(api: Api, path: str, headers: dict[str, str]) -> None:
    """Send the headers and part of the body over a real socket, then close it."""
    server = api.client.server
    _, writer = await asyncio.open_connection(server.host, server.port)
    head = [f"POST {path} HTTP/1.1", f"Host: {server.host}", "Content-Length: 100000"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"events": [{"action": "pu')
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()  # a reset, not a clean close
    await asyncio.sleep(0.2)


async def test_a_webhook_whose_connection_drops_mid_body(
    api: Api, server_log_tail: LogTail
) -> None:
    await drop_mid_body(
        api,
        "/v1/webhooks/registry",
        {"Content-Type": REGISTRY_V1, "Authorization": f"Bearer {WEBHOOK_SECRET}"},
    )
    await drop_mid_body(
        api, f"/v1/webhooks/dockerhub/{WEBHOOK_SECRET}", {"Content-Type": "application/json"}
    )
    text = await logged(server_log_tail, "/v1/webhooks/registry", "/v1/webhooks/dockerhub/***")
    assert_no_secret(text)
    # The server still answers.
    resp = await api.client.get("/v1/version", headers=api.auth)
    assert resp.status == 200


async def test_a_500_in_a_route_while_the_password_is_in_scope(
    api: Api, server_log_tail: LogTail
) -> None:
    # The server handles a deploy with a secret env value, then meets a record in etcd it
    # cannot read (garbage, with that value in it): the route fails with a 500.
    await api.deploy({"version": "bad:tag", "env": {"API_KEY": ENV_SECRET}}, expect=400)
    garbage = {"id": "x", "service": api.service, "env": ["API_KEY", ENV_SECRET]}
    key = f"{api.deployster.settings.etcd_prefix}/deploys/{api.service}/broken"
    await api.deployster.etcd.put(key.encode(), json.dumps(garbage).encode())
    resp = await api.client.get(api.url("/deploys/broken"), headers=api.auth)
    assert resp.status == 500
    text = await logged(server_log_tail, "request_failed", "ValidationError")
    assert_no_secret(text)


async def test_an_exception_in_the_deploy_handler_with_a_bad_policy_and_env_in_scope(
    api: Api, server_log_tail: LogTail
) -> None:
    key = f"{api.deployster.settings.etcd_prefix}/services/{api.service}/policy"
    await api.deployster.etcd.put(key.encode(), b'{"drain": "a while"}')
    failed = await api.deploy({"version": "v1", "env": {"API_KEY": ENV_SECRET}}, expect=502)
    assert failed["description"].startswith("The deploy failed:"), failed
    text = await logged(server_log_tail, "deploy_not_started", "ValidationError")
    assert_no_secret(text)
    # The lock was released: with a readable policy the service deploys.
    await api.deployster.store.save_policy(api.service, FAST_POLICY)
    assert (await api.deployed({"version": "v1"}))["state"] == "succeeded"


async def test_a_resumed_deploy_that_cannot_start_with_env_in_scope(
    api: Api, server_log_tail: LogTail
) -> None:
    # A pending record an older server left, with a secret env value and a unit name that no
    # longer passes (full-width digits): it fails once, logged without the value.
    stamp = "\uff12\uff10\uff12\uff16.11.26-00.00.00"
    pending = DeployRecord(
        id="20261126-000000-envsec",
        service=api.service,
        version="v9",
        timestamp=stamp,
        instance_count=1,
        destroy_previous=False,
        env={"API_KEY": ENV_SECRET},
        units=[f"{api.service}:v9:{stamp}@1.service"],
        policy=FAST_POLICY,
    )
    await api.deployster.store.save_deploy(pending)
    assert await api.deployster.deploys.resume() == 1
    text = await logged(server_log_tail, "UnitValueError", "deploy_finished")
    assert_no_secret(text)
    assert await api.deployster.deploys.resume() == 0


async def test_a_task_error_with_env_in_scope(api: Api, server_log_tail: LogTail) -> None:
    resp = await api.client.post(
        api.url("/tasks"),
        json={"task": {"version": "v1", "command": "true", "env": {"API_KEY": ENV_SECRET}}},
        headers=api.auth,
    )
    await resp.read()
    text = await logged(server_log_tail, "task_runner_failed", "AttributeError")
    assert_no_secret(text)


def test_the_session_check_finds_a_secret_in_any_log(tmp_path: Path) -> None:
    # Not named *.log: the session's own check must not find this test's planted secret.
    clean, dirty = tmp_path / "clean.txt", tmp_path / "dirty.txt"
    clean.write_text('{"event": "fine"}\n')
    dirty.write_text(f'{{"event": "oops", "value": "{ENV_SECRET}"}}\n')
    assert leaked_secrets([clean], KNOWN_SECRETS) == []
    assert leaked_secrets([clean, dirty], KNOWN_SECRETS) == [f"{dirty}: {ENV_SECRET!r}"]
