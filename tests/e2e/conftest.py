"""e2e fixtures: a registry, podman's API service and the busybox test image for the whole run,
and a Deployster wired to them (real etcd from tests/conftest.py)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import encode_basic_auth
from aiohttp.test_utils import TestClient
from e2e.podman import Podman, build_image, remove_containers, remove_images, start_podman
from e2e.registry import Registry, start_registry
from helpers import E2E_PASSWORD as PASSWORD

from deployster.config import Settings
from deployster.server import Deployster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes more than a minute; CI runs it like every other test"
    )


@pytest.fixture(scope="session")
def run_token() -> str:
    """In every name this run gives an image, a repository or a prefix."""
    return f"e2e{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def podman(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, run_token: str
) -> Iterator[Podman]:
    service = start_podman(tmp_path_factory.mktemp("podman"), insecure_registries=[registry.host])
    yield service
    remove_containers(service, run_token)
    remove_images(service, run_token)
    service.stop()


@dataclass(frozen=True)
class Images:
    """The local test images and where this run's service images live in the registry."""

    plain: str  # no ENTRYPOINT: a command string runs under /bin/sh -c
    wrapped: str  # ENTRYPOINT ["/bin/sh", "-c"], as images built for the original had
    registry: Registry
    prefix: str  # -registry-url: <registry>/<run token>

    def publish(self, service: str, version: str, local: str | None = None) -> str:
        """Push a test image as ``<prefix>/<service>:<version>``, the image Deployster runs."""
        return self.registry.push_local(
            local or self.plain, f"{self.prefix.split('/', 1)[1]}/{service}:{version}"
        )


@pytest.fixture(scope="session")
def images(
    tmp_path_factory: pytest.TempPathFactory, podman: Podman, registry: Registry, run_token: str
) -> Images:
    workdir = tmp_path_factory.mktemp("image")
    plain = build_image(podman, workdir, f"localhost/{run_token}/busybox:1")
    wrapped = build_image(
        podman, workdir, f"localhost/{run_token}/wrapped:1", entrypoint=["/bin/sh", "-c"]
    )
    return Images(plain, wrapped, registry, f"{registry.host}/{run_token}")


@dataclass
class TasksApi:
    """A Deployster on a test client, with a service name and an etcd prefix of its own."""

    client: TestClient
    deployster: Deployster
    service: str
    images: Images

    headers = {"Authorization": encode_basic_auth("deployster", PASSWORD)}

    def url(self, rest: str = "") -> str:
        return f"/v1/services/{self.service}/tasks{rest}"

    async def run(self, task: dict[str, Any]) -> tuple[int, bytes]:
        """POST a task; its status and whole body."""
        response = await self.client.post(self.url(), json={"task": task}, headers=self.headers)
        return response.status, await response.read()

    async def record(self, task_id: str) -> dict[str, Any]:
        response = await self.client.get(self.url(f"/{task_id}"), headers=self.headers)
        assert response.status == 200, await response.text()
        return dict((await response.json())["task"])

    async def records(self) -> list[dict[str, Any]]:
        response = await self.client.get(self.url(), headers=self.headers)
        assert response.status == 200
        return list((await response.json())["tasks"])


def settings_for(
    etcd_endpoint: str, podman: Podman, images: Images, prefix: str, **extra: Any
) -> Settings:
    options: dict[str, Any] = {
        "etcd": etcd_endpoint,
        "etcd_prefix": prefix,
        "password": PASSWORD,
        "template": "workload",
        # No deploys here: fleet is never called.
        "fleet_endpoint": "http://127.0.0.1:9",
        "registry_url": images.prefix,
        "docker_endpoint": podman.endpoint,
        **extra,
    }
    return Settings(**options)


@contextlib.asynccontextmanager
async def tasks_api_for(
    aiohttp_client: Any, settings: Settings, images: Images, service: str | None = None
) -> AsyncIterator[TasksApi]:
    deployster = await Deployster.connect(settings)
    try:
        client = await aiohttp_client(deployster.app)
        await deployster.start()
        yield TasksApi(client, deployster, service or f"svc-{secrets.token_hex(3)}", images)
    finally:
        await deployster.close()


@pytest.fixture
def etcd_prefix(run_token: str) -> str:
    return f"/deployster-{run_token}-{secrets.token_hex(3)}"


@pytest.fixture
async def tasks_api(
    aiohttp_client: Any, etcd_endpoint: str, podman: Podman, images: Images, etcd_prefix: str
) -> AsyncIterator[TasksApi]:
    settings = settings_for(etcd_endpoint, podman, images, etcd_prefix)
    async with tasks_api_for(aiohttp_client, settings, images) as api:
        images.publish(api.service, "v1")
        yield api
