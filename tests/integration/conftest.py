"""Integration fixtures: localfleet over HTTP and a Deployster app wired to real etcd."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import encode_basic_auth
from aiohttp.test_utils import TestClient
from helpers import PASSWORD, eventually, wait_http
from integration.traefik import Traefik, traefik  # noqa: F401  (a fixture for every integration test)

from deployster.config import Settings
from deployster.fleet import FleetClient, FleetError
from deployster.launchers import free_port
from deployster.naming import UnitName
from deployster.policy import HealthPolicy, ServicePolicy
from deployster.server import Deployster
from handlers.deploys import DeployConfig

# Production defaults wait 10 s of healthy time and drain for 10 s; tests need neither.
FAST_POLICY = ServicePolicy(
    health=HealthPolicy(interval=0.1, timeout=1.0, healthy_threshold=1, unhealthy_threshold=2),
    min_healthy_time=0,
    drain=0,
    instance_deadline=20,
    deploy_deadline=30,
)


async def fleet_units(fleet: FleetClient, service: str) -> list[str]:
    """The service's unit names as fleet lists them now (every unit of the fleet, read in
    full: the truth a test compares the server with)."""
    return [
        unit.name
        for unit in await fleet.list_units()
        if (name := UnitName.parse(unit.name)) is not None and name.service == service
    ]


def basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": encode_basic_auth(user, password)}


@contextlib.contextmanager
def localfleet_child(
    state: pathlib.Path, machines: int = 3
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """localfleet as a real process on a loopback port: its endpoint and the process (which a
    fault test may pause)."""
    port = free_port()
    log = state / "localfleet.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployster",
                "localfleet",
                "--listen",
                f"127.0.0.1:{port}",
                "--machines",
                str(machines),
                "--state-dir",
                str(state / "state"),
            ],
            stdout=out,
            stderr=out,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/fleet/v1/machines", child, log)
        yield endpoint, child
    finally:
        os.kill(child.pid, signal.SIGCONT)  # a paused one must be able to stop
        child.terminate()
        child.wait(60)


@contextlib.contextmanager
def localfleet_process(state: pathlib.Path, machines: int = 3) -> Iterator[str]:
    """localfleet as a real process on a loopback port; yields its endpoint."""
    with localfleet_child(state, machines) as (endpoint, _):
        yield endpoint


@pytest.fixture(scope="session")
def localfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """localfleet with three machines, shared by the session."""
    with localfleet_process(tmp_path_factory.mktemp("localfleet")) as endpoint:
        yield endpoint


@dataclass
class Api:
    """A Deployster app on a test client, and the real systems behind it."""

    client: TestClient
    deployster: Deployster
    fleet: FleetClient
    service: str  # a service name of this test's own, so tests never see each other's units

    @property
    def auth(self) -> dict[str, str]:
        return basic_auth("deployster", PASSWORD)

    def url(self, rest: str = "") -> str:
        return f"/v1/services/{self.service}{rest}"

    async def units(self, service: str | None = None) -> list[str]:
        return await fleet_units(self.fleet, service or self.service)

    async def deploy(self, body: dict[str, Any], expect: int = 201) -> dict[str, Any]:
        resp = await self.client.post(
            self.url("/deploys"), json={"deploy": body}, headers=self.auth
        )
        data: dict[str, Any] = await resp.json()
        assert resp.status == expect, data
        return data

    async def record(self, deploy_id: str) -> dict[str, Any]:
        resp = await self.client.get(self.url(f"/deploys/{deploy_id}"), headers=self.auth)
        assert resp.status == 200
        return dict((await resp.json())["deploy"])

    async def finished(self, deploy_id: str, timeout: float = 30) -> dict[str, Any]:
        """The deploy's record once it has ended."""

        async def ended() -> dict[str, Any] | None:
            rec = await self.record(deploy_id)
            return rec if rec["state"] not in ("pending", "running") else None

        return await eventually(ended, timeout=timeout, interval=0.1)

    async def deployed(self, body: dict[str, Any]) -> dict[str, Any]:
        """Deploy and wait until the deploy ended (one deploy of a service runs at a time)."""
        return await self.finished((await self.deploy(body))["deploy"]["id"])


@contextlib.asynccontextmanager
async def running_api(
    aiohttp_client,
    etcd_endpoint: str,
    localfleet: str,
    prefix: str = "",
    **settings: object,
) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    """A Deployster app on a test client with its own etcd prefix (or ``prefix``, shared by
    several servers) and service name."""
    prefix = prefix or f"/deployster-test-{secrets.token_hex(4)}"
    options: dict[str, object] = {
        "router": "vulcand",
        "vulcand_prefix": f"vulcand-{secrets.token_hex(4)}",
        "vulcand_settle": 0,
        "template": "workload",
        **settings,
    }
    config = DeployConfig(
        image_prefix="deployster",
        etcd_endpoints=etcd_endpoint,
        etcd_prefix=prefix,
        poll_interval=0.2,
        router_timeout=5,
    )
    deployster = await Deployster.connect(
        Settings(
            etcd=etcd_endpoint,
            etcd_prefix=prefix,
            fleet_endpoint=localfleet,
            password=PASSWORD,
            **options,
        ),  # type: ignore[arg-type]
        config,
    )
    try:
        client = await aiohttp_client(deployster.app)
        service = f"svc-{secrets.token_hex(3)}"
        await deployster.store.save_policy(service, FAST_POLICY)
        await deployster.start()
        yield Api(client, deployster, deployster.fleet, service)
    finally:
        with contextlib.suppress(FleetError):
            for name in await fleet_units(deployster.fleet, service):
                await deployster.fleet.destroy_unit(name)
        await deployster.close()


@pytest.fixture
async def api(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    """Deployster routing through vulcand's layout (no vulcand runs: it only needs the keys)."""
    async with running_api(aiohttp_client, etcd_endpoint, localfleet) as running:
        yield running


@pytest.fixture
async def traefik_api(
    aiohttp_client, etcd_endpoint: str, localfleet: str, traefik: Traefik
) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    """Deployster routing through the real Traefik of the session."""
    async with running_api(
        aiohttp_client,
        etcd_endpoint,
        localfleet,
        router="traefik",
        traefik_root=traefik.root_key,
        traefik_api=traefik.api_url,
    ) as running:
        yield running
