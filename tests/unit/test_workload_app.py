"""The test workload in-process: settings from the environment, its HTTP answers."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

from deployster.launchers import free_port
from deployster.testing import workload
from deployster.testing.workload import (
    AnnounceError,
    WorkloadSettings,
    announced_url,
    build_app,
    settings_error,
)

ClientFactory = Callable[[Any], Awaitable[TestClient]]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEPLOYSTER_") or name == "COREOS_PRIVATE_IPV4":
            monkeypatch.delenv(name)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DEPLOYSTER_SERVICE": "hello",
        "DEPLOYSTER_VERSION": "v1",
        "DEPLOYSTER_INSTANCE": "3",
        "DEPLOYSTER_UNIT": "hello:v1:2015.03.02-00.31.45@3.service",
        "DEPLOYSTER_MACHINE": "m1",
        "DEPLOYSTER_ETCD": "http://127.0.0.1:2379",
        "DEPLOYSTER_ANNOUNCE_KEY": "/deployster/instances/hello/v1:2015.03.02-00.31.45/3",
        "DEPLOYSTER_WORKLOAD_HEALTH": "fail",
        "DEPLOYSTER_WORKLOAD_STARTUP_DELAY": "0.5",
        "DEPLOYSTER_WORKLOAD_HOST": "0.0.0.0",
        "DEPLOYSTER_TIMESTAMP": "ignored",
    }.items():
        monkeypatch.setenv(name, value)

    settings = WorkloadSettings()

    assert settings.identity() == {
        "service": "hello",
        "version": "v1",
        "instance": 3,
        "unit": "hello:v1:2015.03.02-00.31.45@3.service",
    }
    assert settings.machine == "m1"
    assert settings.etcd == "http://127.0.0.1:2379"
    assert settings.workload_health == "fail"
    assert settings.workload_startup_delay == 0.5
    assert settings.workload_host == "0.0.0.0"


def test_defaults() -> None:
    settings = WorkloadSettings()
    assert settings.etcd is None
    assert settings.announce_key is None
    assert settings.workload_health == "ok"
    assert settings.workload_startup_delay == 0.0
    assert settings.workload_host == "127.0.0.1"
    assert settings.machine == socket.gethostname()


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYSTER_ETCD", "")
    assert WorkloadSettings().etcd is None


@pytest.mark.parametrize(
    ("env", "sentence"),
    [
        (
            {"DEPLOYSTER_WORKLOAD_HEALTH": "maybe"},
            "workload: DEPLOYSTER_WORKLOAD_HEALTH='maybe' is not valid: "
            "Input should be 'ok' or 'fail'.",
        ),
        (
            {"DEPLOYSTER_WORKLOAD_STARTUP_DELAY": "-1"},
            "workload: DEPLOYSTER_WORKLOAD_STARTUP_DELAY='-1' is not valid: "
            "Input should be greater than or equal to 0.",
        ),
        (
            {"DEPLOYSTER_ETCD": "http://127.0.0.1:2379"},
            "workload: DEPLOYSTER_ETCD is set but DEPLOYSTER_ANNOUNCE_KEY is not: "
            "set both to announce, or neither.",
        ),
        (
            {"DEPLOYSTER_ETCD": "ftp://x", "DEPLOYSTER_ANNOUNCE_KEY": "/k"},
            "workload: DEPLOYSTER_ETCD='ftp://x' is not valid: not an etcd endpoint",
        ),
    ],
)
def test_invalid_settings_read_as_sentences(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], sentence: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        WorkloadSettings()
    assert settings_error(caught.value).startswith(sentence)


async def test_identity_and_health(aiohttp_client: ClientFactory) -> None:
    settings = WorkloadSettings(service="hello", version="v1", instance=2, unit="u@2.service")
    client = await aiohttp_client(build_app(settings))

    root = await client.get("/")
    assert root.status == 200
    assert await root.json() == {
        "service": "hello",
        "version": "v1",
        "instance": 2,
        "unit": "u@2.service",
    }
    health = await client.get("/health")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}


async def test_failing_health_still_serves(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_app(WorkloadSettings(workload_health="fail")))

    health = await client.get("/health")
    assert health.status == 503
    assert await health.json() == {"status": "fail"}
    assert (await client.get("/")).status == 200


async def test_slow(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_app(WorkloadSettings(service="s")))

    slow = await client.get("/slow", params={"seconds": "0.01"})
    assert slow.status == 200
    assert (await slow.json())["service"] == "s"
    for bad in ("x", "-1", "61"):
        answer = await client.get("/slow", params={"seconds": bad})
        assert answer.status == 400


def test_announced_url(monkeypatch: pytest.MonkeyPatch) -> None:
    def bound(family: int, host: str) -> socket.socket:
        sock = socket.socket(family)
        sock.bind((host, 0))
        return sock

    with bound(socket.AF_INET, "127.0.0.1") as sock:
        assert announced_url(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}"
    with bound(socket.AF_INET, "0.0.0.0") as sock:
        port = sock.getsockname()[1]
        assert announced_url(sock) == f"http://127.0.0.1:{port}"
        monkeypatch.setenv("COREOS_PRIVATE_IPV4", "10.0.0.7")
        assert announced_url(sock) == f"http://10.0.0.7:{port}"
    if socket.has_ipv6:
        try:
            sock = bound(socket.AF_INET6, "::1")
        except OSError:
            return
        with sock:
            assert announced_url(sock) == f"http://[::1]:{sock.getsockname()[1]}"


async def test_unreachable_etcd_fails_the_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    # A unit whose instance cannot announce must fail, not serve unseen.
    monkeypatch.setattr(workload, "ANNOUNCE_TIMEOUT", 0.5)
    settings = WorkloadSettings(etcd=f"http://127.0.0.1:{free_port()}", announce_key="/k")

    with pytest.raises(
        AnnounceError, match=re.escape("etcd did not take the announcement within 0.5 s")
    ):
        await asyncio.wait_for(workload.serve(settings, asyncio.Event()), 20)
