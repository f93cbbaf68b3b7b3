"""The main job, as a user does it: ``deployster up`` on its default docker template deploys a
locally built HTTP image pushed to the registry, through podman's docker CLI (Debian's
``podman-docker``), cycles it v1 -> v2 under load through Traefik without one failed
request, rolls a broken v3 back with the reason from its log, and destroys it without a
container left behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from e2e.conftest import Images
from e2e.podman import Podman, podman_docker_cli
from helpers import eventually

from deployster.launchers import free_port
from deployster.testing.load import Load

BIN = Path(sys.executable).parent
PASSWORD = "e2e-up-secret"
# The image's main process: busybox httpd in the background, and a shell that exits at
# once on SIGTERM (as PID 1 it would otherwise ignore it, and docker stop would wait 30 s).
SERVE = ["/bin/sh", "-c", "trap 'exit 0' TERM; httpd -f -p 3000 -h /www & wait"]
BROKEN = ["/bin/sh", "-c", "echo 'fatal: DATABASE_URL is not set' >&2; exit 3"]
POLICY = {
    "health": {"interval": 0.2, "timeout": 1, "healthy_threshold": 1, "unhealthy_threshold": 2},
    "min_healthy_time": 1,
    "drain": 1,
    "instance_deadline": 60,
    "deploy_deadline": 120,
}


def http_image(podman: Podman, workdir: Path, base: str, name: str, cmd: list[str]) -> str:
    """``base`` plus /www (index.html naming the version, health) and ``cmd``, as ``name``."""
    version = name.rpartition(":")[2]
    context = workdir / version
    (context / "www").mkdir(parents=True)
    (context / "www" / "index.html").write_text(f"{version}\n")
    (context / "www" / "health").write_text("ok\n")
    (context / "Containerfile").write_text(f"FROM {base}\nCOPY www /www\nCMD {json.dumps(cmd)}\n")
    built = podman.cli("build", "--quiet", "--tag", name, str(context))
    assert built.returncode == 0, built.stderr
    return name


@dataclass
class Up:
    process: subprocess.Popen[str]
    api: str
    traffic: str
    banner: str
    env: dict[str, str]

    async def ctl(self, *args: str) -> tuple[int, str]:
        child = await asyncio.create_subprocess_exec(
            str(BIN / "deployctl"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "DEPLOYSTER_URL": self.api, "DEPLOYSTER_PASSWORD": PASSWORD},
        )
        out, _ = await asyncio.wait_for(child.communicate(), 150)
        assert child.returncode is not None
        return child.returncode, out.decode()


@pytest.fixture
def up(tmp_path: Path, podman: Podman, images: Images) -> Iterator[Up]:
    api, http = free_port(), free_port()
    env = {**podman.env, "DEPLOYSTER_PASSWORD": PASSWORD}
    process = subprocess.Popen(
        [
            str(BIN / "deployster"),
            "up",
            *("--state-dir", str(tmp_path / "state")),
            *("--listen", f"127.0.0.1:{api}", "--http-listen", f"127.0.0.1:{http}"),
            *("--etcd-listen", "127.0.0.1:0", "--traefik-api-listen", "127.0.0.1:0"),
            *("--registry-url", images.prefix, "--docker-cli", podman_docker_cli()),
            *("--docker-endpoint", podman.endpoint),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    banner = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not banner.endswith("Press Ctrl-C to stop.\n"):
        line = process.stdout.readline()
        if not line:
            break
        banner += line
    if "Press Ctrl-C" not in banner:
        process.kill()
        pytest.fail(f"deployster up did not come up:\n{banner}{process.stdout.read()}")
    started = Up(process, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{http}/", banner, env)
    try:
        yield started
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=120)
            assert process.returncode == 0, out


async def serving(url: str, host: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url, headers={"Host": host}) as resp,
    ):
        return f"{resp.status} {(await resp.text()).strip()}"


def containers_of(podman: Podman, service: str) -> list[dict[str, object]]:
    listed = podman.cli("ps", "--all", "--format", "json", "--filter", f"name={service}-")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout or "[]"))


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_up_deploys_cycles_rolls_back_and_destroys_a_real_image(
    up: Up, podman: Podman, images: Images, run_token: str, tmp_path: Path
) -> None:
    service = f"web{run_token[3:]}"
    host = f"{service}.localhost"
    assert f"template  docker  (docker {podman_docker_cli()}," in up.banner
    assert "published on 127.0.0.1" in up.banner
    assert f"images    {images.prefix}/<service>:<version>" in up.banner
    for version, cmd in (("v1", SERVE), ("v2", SERVE), ("v3", BROKEN)):
        local = http_image(
            podman,
            tmp_path / "images",
            images.plain,
            f"localhost/{run_token}/{service}:{version}",
            cmd,
        )
        images.publish(service, version, local)

    auth = {"Authorization": aiohttp.encode_basic_auth("deployster", PASSWORD)}
    async with (
        aiohttp.ClientSession(headers=auth) as session,
        session.put(f"{up.api}/v1/services/{service}/policy", json={"policy": POLICY}) as resp,
    ):
        assert resp.status == 200, await resp.text()

    code, out = await up.ctl("deploy", service, "v1", "--instances", "3", "--wait")
    assert code == 0, out
    assert await serving(up.traffic, host) == "200 v1"
    running = containers_of(podman, service)
    assert len(running) == 3
    # Pulled from the registry (the policy's default, missing) and published on 127.0.0.1 only.
    assert {c["Image"] for c in running} == {f"{images.prefix}/{service}:v1"}
    assert {p["host_ip"] for c in running for p in c["Ports"]} == {"127.0.0.1"}  # type: ignore[attr-defined]

    load = Load(up.traffic, host)
    async with load.running(clients=6):
        await asyncio.sleep(1)
        code, out = await up.ctl("deploy", service, "v2", "--wait")
        assert code == 0, out
        await asyncio.sleep(1)
    print(f"\n[up-docker] {load.summary()}")
    assert load.failures == []
    assert set(load.versions) == {"v1", "v2"} and min(load.versions.values()) > 0
    assert await serving(up.traffic, host) == "200 v2"

    code, out = await up.ctl("deploy", service, "v3", "--wait")
    assert code == 3, out
    assert "rolling_back: unit " in out and "its last log lines:" in out
    assert "fatal: DATABASE_URL is not set" in out, out
    assert out.rstrip().endswith("rolled back.")
    assert await serving(up.traffic, host) == "200 v2"
    code, releases = await up.ctl("releases", service)
    assert code == 0 and re.search(
        r"v3 +rolled_back .*lines: \| .*DATABASE_URL is not set", releases
    ), releases

    code, out = await up.ctl("destroy", service, "v2")
    assert code == 0, out

    async def none_left() -> bool:
        return containers_of(podman, service) == []

    await eventually(none_left, timeout=60, interval=0.5)
