"""Deploys survive their surroundings: a server killed mid-deploy, an etcd restarted mid-deploy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import eventually, process_running
from integration.conftest import PASSWORD, basic_auth, running_api

from deployster.launchers import EtcdServer, free_port
from deployster.naming import UnitName

# The deploy stays in the ``waiting`` step for min_healthy_time: long enough to kill the
# server (or restart etcd) while it waits, short enough for a test.
SLOW_POLICY: dict[str, Any] = {
    "health": {"interval": 0.1, "healthy_threshold": 1},
    "min_healthy_time": 3,
    "drain": 0,
    "instance_deadline": 30,
    "deploy_deadline": 60,
}


class ServerProcess:
    """`deployster serve` as a real process; started again with the same flags after a kill."""

    def __init__(self, log_dir: Path, etcd: str, fleet: str) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.flags = [
            "--listen",
            f"127.0.0.1:{self.port}",
            "--etcd",
            etcd,
            "--etcd-prefix",
            f"/deployster-resume-{secrets.token_hex(4)}",
            "--fleet-endpoint",
            fleet,
            "--template",
            "workload",
            "--router",
            "vulcand",
            "--vulcand-prefix",
            f"vulcand-{secrets.token_hex(4)}",
            "--vulcand-settle",
            "0",
            "--log-format",
            "json",
        ]
        self.children: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def child(self) -> subprocess.Popen[bytes]:
        return self.children[-1]

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYSTER_")}
        env["DEPLOYSTER_PASSWORD"] = PASSWORD
        log = self.log_dir / f"server-{len(self.children) + 1}.log"
        with open(log, "wb") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "deployster", "serve", *self.flags],
                stdout=out,
                stderr=out,
                env=env,
            )
        self.children.append(child)
        self.logs.append(log)
        return child

    def log_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.logs if p.exists()
        )

    def kill(self) -> None:
        self.child.send_signal(signal.SIGKILL)
        self.child.wait(10)

    def stop(self) -> int:
        self.child.send_signal(signal.SIGTERM)
        return self.child.wait(30)

    def cleanup(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait(10)


@pytest.fixture
def server(tmp_path: Path, etcd_endpoint: str, localfleet: str) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path, etcd_endpoint, localfleet)
    try:
        yield process
    finally:
        process.cleanup()


@contextlib.asynccontextmanager
async def http(base: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base, headers=basic_auth("deployster", PASSWORD), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


async def wait_up(
    session: aiohttp.ClientSession, server: ServerProcess, timeout: float = 20
) -> None:
    async def answers() -> bool:
        assert server.child.poll() is None, (
            f"server exited {server.child.returncode}:\n{server.log_text()}"
        )
        try:
            async with session.get("/v1/version") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(answers, timeout=timeout, interval=0.1)


async def get_record(
    session: aiohttp.ClientSession, service: str, deploy_id: str
) -> dict[str, Any]:
    async with session.get(f"/v1/services/{service}/deploys/{deploy_id}") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return dict(body["deploy"])


async def wait_state(
    session: aiohttp.ClientSession,
    service: str,
    deploy_id: str,
    states: tuple[str, ...],
    timeout: float,
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        with contextlib.suppress(aiohttp.ClientError):
            record = await get_record(session, service, deploy_id)
            return record if record["state"] in states else None
        return None

    return await eventually(reached, timeout=timeout, interval=0.05)


async def unit_names(session: aiohttp.ClientSession, service: str) -> list[str]:
    async with session.get(f"/v1/services/{service}/units") as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return sorted(
        f"{service}:{u['version']}:{u['deploy_timestamp']}@{u['instance']}.service"
        for u in body["units"]
    )


async def test_a_deploy_resumes_after_the_server_is_killed(server: ServerProcess) -> None:
    service = f"svc-{secrets.token_hex(3)}"
    server.start()
    async with http(server.url) as session:
        try:
            await wait_up(session, server)
            async with session.put(
                f"/v1/services/{service}/policy", json={"policy": SLOW_POLICY}
            ) as resp:
                assert resp.status == 200, await resp.text()

            async with session.post(
                f"/v1/services/{service}/deploys",
                json={"deploy": {"version": "v1", "instance_count": 2}},
            ) as resp:
                body = await resp.json()
                assert resp.status in (201, 202), body
            first = body["deploy"]
            first = await wait_state(
                session, service, first["id"], ("succeeded", "failed", "rolled_back"), 60
            )
            assert first["state"] == "succeeded", (first, server.log_text())
            assert await unit_names(session, service) == sorted(first["units"])

            async with session.post(
                f"/v1/services/{service}/deploys",
                json={"deploy": {"version": "v2", "destroy_previous": True}},
            ) as resp:
                body = await resp.json()
                assert resp.status in (201, 202), body
            second_id = body["deploy"]["id"]
            running = await wait_state(
                session, service, second_id, ("running", "succeeded", "failed", "rolled_back"), 30
            )
            # min_healthy_time (3 s) keeps it waiting: the kill lands mid-deploy.
            assert running["state"] == "running", running
            killed_pid = server.child.pid
            server.kill()
            assert not process_running(killed_pid)
            killed_at = time.monotonic()
            # Still running in etcd: nobody finished it.
            assert running["step"] in ("waiting", "switching"), running

            server.start()
            await wait_up(session, server)
            second = await wait_state(
                session, service, second_id, ("succeeded", "failed", "rolled_back"), 60
            )
            print(
                f"\n[resume] deploy {second_id} ended {second['state']} "
                f"{time.monotonic() - killed_at:.1f} s after the kill"
            )
            assert second["state"] == "succeeded", (second, server.log_text())
            assert second["step"] == "done"
            assert second["previous_units"] == first["units"]
            assert len(second["units"]) == 2
            assert all(":v2:" in u for u in second["units"])

            async def only_v2() -> list[str] | None:
                units = await unit_names(session, service)
                return units if units == sorted(second["units"]) else None

            await eventually(only_v2, timeout=10, interval=0.1)
            units = await unit_names(session, service)
            assert not any(":v1:" in u for u in units), units
            # The record is still there, and the deploys list has both.
            assert (await get_record(session, service, second_id))["state"] == "succeeded"
            async with session.get(f"/v1/services/{service}/deploys") as resp:
                listed = [d["id"] for d in (await resp.json())["deploys"]]
            assert second_id in listed and first["id"] in listed
            assert "deploy_resumed" in server.logs[-1].read_text(), server.log_text()
        finally:
            with contextlib.suppress(Exception):
                if server.child.poll() is None:
                    for version in ("v2", "v1"):
                        async with session.delete(
                            f"/v1/services/{service}/deploys/{version}"
                        ) as resp:
                            assert resp.status in (204, 404), await resp.text()
    assert server.stop() == 0, server.log_text()


async def test_a_deploy_completes_across_an_etcd_restart(
    aiohttp_client, tmp_path: Path, private_etcd: EtcdServer, localfleet: str
) -> None:  # type: ignore[no-untyped-def]
    etcd = private_etcd
    async with running_api(aiohttp_client, etcd.endpoint, localfleet) as api:
        resp = await api.client.put(
            api.url("/policy"),
            headers=api.auth,
            json={"policy": {**SLOW_POLICY, "min_healthy_time": 2}},
        )
        assert resp.status == 200, await resp.text()
        created = (
            await api.deploy({"version": "v1", "instance_count": 2, "destroy_previous": True})
        )["deploy"]
        assert created["state"] == "running", created

        # Both instances announced (the announcements outlive the restart in etcd's data).
        async def announced() -> bool:
            return all(
                api.deployster.instances.get(n) is not None
                for n in map(UnitName.parse, created["units"])
                if n is not None
            )

        await eventually(announced, timeout=30, interval=0.05)
        assert (await api.record(created["id"]))["state"] == "running"

        etcd.stop()
        await asyncio.sleep(1)
        etcd.start(log_path=tmp_path / "etcd.log")
        await asyncio.to_thread(etcd.wait_ready)
        restarted_at = time.monotonic()

        async def record_readable() -> dict[str, Any] | None:
            try:
                return await api.record(created["id"])
            except AssertionError:
                return None

        await eventually(record_readable, timeout=30, interval=0.2)
        done = await api.finished(created["id"], timeout=60)
        print(
            f"\n[etcd-restart] deploy ended {done['state']} {time.monotonic() - restarted_at:.1f} s after the restart"
        )
        assert done["state"] == "succeeded", (done["error"], done)
        assert sorted(await api.units()) == sorted(created["units"])
