"""Fault fixtures: an etcd, a localfleet and a Traefik of the test's own, so that the test may
pause (SIGSTOP/SIGCONT) or kill them mid-deploy, and a Deployster app through that Traefik."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from integration.conftest import FAST_POLICY, Api, localfleet_child, running_api
from integration.traefik import Traefik, traefik_child

from deployster.launchers import EtcdServer


@dataclass
class Paused:
    """A child process that a test can freeze: requests to it hang as on a dead network."""

    process: subprocess.Popen[bytes]

    @contextlib.asynccontextmanager
    async def paused(self, seconds: float) -> AsyncIterator[None]:
        """Frozen for ``seconds`` (the body runs at the start of the pause)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
            await asyncio.sleep(seconds)
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def fault_etcd(private_etcd: EtcdServer) -> Paused:
    assert private_etcd.process is not None
    return Paused(private_etcd.process)


@pytest.fixture
def fault_fleet(tmp_path: Path) -> Iterator[tuple[str, Paused]]:
    """localfleet with two machines, of this test alone."""
    with localfleet_child(tmp_path, machines=2) as (endpoint, child):
        yield endpoint, Paused(child)


@pytest.fixture
def fault_traefik(private_etcd: EtcdServer, tmp_path: Path) -> Iterator[Traefik]:
    """Traefik watching the test's own etcd."""
    with traefik_child(private_etcd.endpoint, "traefik", tmp_path / "traefik.log") as (found, _):
        yield found


@pytest.fixture
async def fault_api(
    aiohttp_client,  # type: ignore[no-untyped-def]
    private_etcd: EtcdServer,
    fault_fleet: tuple[str, Paused],
    fault_traefik: Traefik,
) -> AsyncIterator[Api]:
    """Deployster on the test's own etcd and localfleet, routing through its Traefik."""
    async with running_api(
        aiohttp_client,
        private_etcd.endpoint,
        fault_fleet[0],
        router="traefik",
        traefik_root=fault_traefik.root_key,
        traefik_api=fault_traefik.api_url,
    ) as api:
        await api.deployster.store.save_policy(
            api.service, FAST_POLICY.model_copy(update={"drain": 0.5})
        )
        yield api
