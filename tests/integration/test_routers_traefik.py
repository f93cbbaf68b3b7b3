"""The Traefik adapter against real etcd and a real Traefik: keys in, traffic out.

Each test uses a service name of its own under the session's Traefik root key, so the tests
share one Traefik without seeing each other's routers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aetcd
import aiohttp
import pytest
from aiohttp import web
from helpers import eventually
from integration.traefik import Traefik

from deployster.routers import RouterTimeoutError, TraefikRouter
from deployster.testing.workload import (
    WorkloadSettings,
    announced_url,
    bind_socket,
    build_app,
)


@dataclass
class Backend:
    instance: int
    url: str


@pytest.fixture
def service() -> str:
    return f"svc-{secrets.token_hex(3)}"


@pytest.fixture
def router(etcd_client: aetcd.Client, traefik: Traefik) -> TraefikRouter:
    return TraefikRouter(
        etcd_client, root_key=traefik.root_key, api_url=traefik.api_url, entrypoint="web"
    )


@pytest.fixture
async def backends(service: str) -> AsyncIterator[Callable[[int], Backend]]:
    """Start test workloads in this process: ``GET /`` answers their instance number."""
    runners: list[web.AppRunner] = []
    started: list[Backend] = []

    async def start(instance: int) -> Backend:
        settings = WorkloadSettings(service=service, instance=instance, _env_file=None)
        sock = bind_socket("127.0.0.1")
        runner = web.AppRunner(build_app(settings), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
        backend = Backend(instance, announced_url(sock))
        started.append(backend)
        return backend

    yield start  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


async def instances_reached(traefik: Traefik, service: str, requests: int) -> set[int]:
    seen: set[int] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for _ in range(requests):
            async with session.get(traefik.web_url, headers={"Host": f"{service}.localhost"}) as r:
                if r.status != 200:
                    seen.add(-r.status)  # a routing error shows up as a negative status
                    continue
                seen.add(int((await r.json())["instance"]))
    return seen


async def timed_wait(
    router: TraefikRouter,
    capsys: pytest.CaptureFixture[str],
    what: str,
    service: str,
    **kwargs: object,
) -> float:
    started = time.monotonic()
    await router.wait_applied(service, timeout=10, **kwargs)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\n[traefik] wait_applied({what}) took {elapsed:.3f} s")
    return elapsed


async def test_traffic_follows_register_and_deregister(
    router: TraefikRouter,
    traefik: Traefik,
    service: str,
    backends: Callable[[int], Backend],
    capsys: pytest.CaptureFixture[str],
) -> None:
    one, two = await backends(1), await backends(2)  # type: ignore[misc]
    await router.ensure_service(service)
    await router.register(service, f"{service}-v1-2026.11.26-12.00.00-1", one.url)
    await router.register(service, f"{service}-v1-2026.11.26-12.00.00-2", two.url)
    await timed_wait(router, capsys, "present", service, present=[one.url, two.url])

    # Round robin over two servers: a handful of requests reaches both.
    async def both() -> bool:
        return await instances_reached(traefik, service, 6) == {1, 2}

    await eventually(both, timeout=5)

    await router.deregister(service, f"{service}-v1-2026.11.26-12.00.00-1")
    await timed_wait(router, capsys, "absent", service, absent=[one.url], present=[two.url])
    assert await instances_reached(traefik, service, 20) == {2}


async def test_same_instance_number_from_two_deploys_gets_two_indexes(
    router: TraefikRouter,
    etcd_client: aetcd.Client,
    traefik: Traefik,
    service: str,
) -> None:
    old, new = f"{service}-v1-2026.11.26-12.00.00-1", f"{service}-v2-2026.11.27-09.30.00-1"
    await router.ensure_service(service)
    await router.register(service, old, "http://127.0.0.1:31001")
    await router.register(service, new, "http://127.0.0.1:31002")
    await router.register(service, old, "http://127.0.0.1:31001")  # idempotent: same index

    routers = f"{traefik.root_key}/http/routers/{service}/"
    keys = {
        kv.key.decode(): kv.value.decode() for kv in await etcd_client.get_prefix(routers.encode())
    }
    assert keys == {
        f"{routers}rule": f"Host(`{service}.localhost`)",
        f"{routers}service": service,
        f"{routers}entrypoints/0": "web",
    }
    declared = await etcd_client.get(
        f"{traefik.root_key}/http/services/{service}/loadbalancer/passhostheader".encode()
    )
    assert declared is not None and declared.value == b"true"
    root = f"{traefik.root_key}/http/services/{service}/loadbalancer/servers/"
    keys = {
        kv.key.decode(): kv.value.decode() for kv in await etcd_client.get_prefix(root.encode())
    }
    assert keys == {
        f"{root}0/url": "http://127.0.0.1:31001",
        f"{root}1/url": "http://127.0.0.1:31002",
    }
    assert await router.servers(service) == {
        old: "http://127.0.0.1:31001",
        new: "http://127.0.0.1:31002",
    }
    # Traefik takes both (the API confirms), and nothing of Deployster's is under its root.
    await router.wait_applied(service, present=["http://127.0.0.1:31001", "http://127.0.0.1:31002"])
    everything = [kv.key.decode() for kv in await etcd_client.get_prefix(traefik.root_key.encode())]
    assert all("/http/routers/" in key or "/http/services/" in key for key in everything)

    await router.deregister(service, old)
    await router.register(service, old, "http://127.0.0.1:31001")  # a new registration
    assert await router.servers(service) == {
        new: "http://127.0.0.1:31002",
        old: "http://127.0.0.1:31001",
    }
    keys = {
        kv.key.decode(): kv.value.decode() for kv in await etcd_client.get_prefix(root.encode())
    }
    assert keys == {
        f"{root}1/url": "http://127.0.0.1:31002",
        f"{root}2/url": "http://127.0.0.1:31001",
    }


async def test_deregistering_server_1_keeps_server_10(
    router: TraefikRouter,
    etcd_client: aetcd.Client,
    service: str,
) -> None:
    await router.ensure_service(service)
    for k in range(11):
        await router.register(service, f"{service}-v1-t-{k}", f"http://127.0.0.1:{31000 + k}")
    # A weight under server 10 must survive too: the delete is by "servers/1/", not "servers/1".
    ten = router.server_prefix(service, 10) + "weight"
    await etcd_client.put(ten.encode(), b"1")
    await router.deregister(service, f"{service}-v1-t-1")
    servers = await router.servers(service)
    assert f"{service}-v1-t-1" not in servers and len(servers) == 10
    assert servers[f"{service}-v1-t-10"] == "http://127.0.0.1:31010"
    assert await etcd_client.get(ten.encode()) is not None


async def test_wait_applied_times_out_with_a_sentence(
    router: TraefikRouter,
    service: str,
) -> None:
    await router.ensure_service(service)
    with pytest.raises(
        RouterTimeoutError, match=r"Traefik at http://127\.0\.0\.1:\d+ did not apply"
    ) as caught:
        await router.wait_applied(service, present=["http://127.0.0.1:1"], timeout=0.5)
    assert "http://127.0.0.1:1" in str(caught.value)
