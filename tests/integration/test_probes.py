"""``/healthz`` and ``/readyz`` against real etcd and localfleet: public, and honest about
what is down."""

from __future__ import annotations

import time

import pytest
from helpers import eventually
from integration.conftest import Api, running_api

from deployster.launchers import EtcdServer, free_port
from deployster.web import meta


async def test_probes_need_no_credentials_and_say_ready(api: Api) -> None:
    resp = await api.client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    resp = await api.client.get("/readyz")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"status": "ready", "etcd": "ok", "fleet": "ok"}


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/healthzz"),
        ("GET", "/healthz/x"),
        ("GET", "/readyz/"),
        ("POST", "/healthz"),
        ("GET", "/v1/version"),
    ],
)
async def test_only_the_listed_routes_are_public(api: Api, method: str, path: str) -> None:
    resp = await api.client.request(method, path)
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthorized"


async def test_etcd_down_is_not_ready_but_alive(
    aiohttp_client, private_etcd: EtcdServer, localfleet: str
) -> None:  # type: ignore[no-untyped-def]
    async with running_api(aiohttp_client, private_etcd.endpoint, localfleet) as api:
        assert (await api.client.get("/readyz")).status == 200
        private_etcd.stop()
        started = time.monotonic()
        resp = await api.client.get("/readyz")
        assert time.monotonic() - started < meta.READY_TIMEOUT + 1
        assert resp.status == 503
        assert await resp.json() == {
            "error": "unavailable",
            "description": "Deployster is not ready: etcd is unreachable.",
        }
        assert (await api.client.get("/healthz")).status == 200
        private_etcd.start()
        private_etcd.wait_ready()

        async def ready_again() -> bool:
            return (await api.client.get("/readyz")).status == 200

        await eventually(ready_again, timeout=15, interval=0.2)


async def test_fleet_down_is_named(aiohttp_client, etcd_endpoint: str, log_lines) -> None:  # type: ignore[no-untyped-def]
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with running_api(aiohttp_client, etcd_endpoint, nowhere) as api:
        resp = await api.client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {
            "error": "unavailable",
            "description": "Deployster is not ready: fleet is unreachable.",
        }
    failed = [line for line in log_lines if line["event"] == "readiness_check_failed"]
    assert failed and failed[0]["system"] == "fleet" and nowhere in str(failed[0]["reason"])


async def test_both_down_are_both_named(aiohttp_client, private_etcd: EtcdServer) -> None:  # type: ignore[no-untyped-def]
    async with running_api(
        aiohttp_client, private_etcd.endpoint, f"http://127.0.0.1:{free_port()}"
    ) as api:
        private_etcd.stop()
        resp = await api.client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())[
            "description"
        ] == "Deployster is not ready: etcd and fleet are unreachable."
        private_etcd.start()
        private_etcd.wait_ready()
