"""Integration fixtures: localfleet over HTTP and a Deployster app wired to real etcd."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import encode_basic_auth
from aiohttp.test_utils import TestClient

from deployster.config import Settings
from deployster.etcd import free_port
from deployster.fleet import FleetClient
from deployster.server import Deployster
from handlers.deploys import DeployConfig, service_units

PASSWORD = "integration-secret"


def wait_http(url: str, child: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{child.args} exited with {child.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()}")


def basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": encode_basic_auth(user, password)}


@pytest.fixture(scope="session")
def localfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """localfleet with three machines, as a real process on a loopback port."""
    state = tmp_path_factory.mktemp("localfleet")
    port = free_port()
    log = state / "localfleet.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "deployster", "localfleet", "--listen", f"127.0.0.1:{port}",
             "--machines", "3", "--state-dir", str(state / "state")],
            stdout=out, stderr=out,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/fleet/v1/machines", child, log)
        yield endpoint
    finally:
        child.terminate()
        child.wait(60)


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
        return [str(name) for name, _ in await service_units(self.fleet, service or self.service)]


@pytest.fixture
async def api(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    settings = Settings(etcd=etcd_endpoint, etcd_prefix=prefix, fleet_endpoint=localfleet,
                        template="workload", password=PASSWORD)
    config = DeployConfig(image_prefix=settings.image_prefix, etcd_endpoints=etcd_endpoint,
                          etcd_prefix=prefix, poll_interval=0.2, deadline=30)
    deployster = await Deployster.connect(settings, config)
    client = await aiohttp_client(deployster.app)
    service = f"svc-{secrets.token_hex(3)}"
    try:
        yield Api(client, deployster, deployster.fleet, service)
    finally:
        for name, _ in await service_units(deployster.fleet, service):
            await deployster.fleet.destroy_unit(str(name))
        await deployster.close()
