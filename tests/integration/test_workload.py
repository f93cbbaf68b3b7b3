"""The test workload as a real process against real etcd, and the docker unit's scripts.

The workload must keep the docker unit's contract: announce ``{"url", "machine", "unit"}``
once it listens, withdraw before it stops. The docker unit's own scripts cannot run a
container here, but they can run against a stand-in ``docker`` that prints what
``docker port`` prints, and against the real ``etcdctl`` and etcd: that checks the quoting
through systemd's and the shell's layers, which is where such scripts break.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aetcd
import aiohttp
import pytest
from helpers import eventually

import deployster
from deployster import etcd
from deployster.keys import announce_key
from deployster.launchers import etcd_binary
from deployster.naming import UnitName
from deployster.units import UnitContext, load_template, render_unit

REPO = Path(deployster.__file__).resolve().parent.parent
MACHINE = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def prefix() -> str:
    """An etcd prefix of this test's own: the etcd server is shared by the session."""
    return f"/test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def etcd_client(etcd_endpoint: str) -> AsyncIterator[aetcd.Client]:
    async with etcd.client(etcd_endpoint) as client:
        yield client


async def read_key(client: aetcd.Client, key: str) -> dict[str, str] | None:
    found = await client.get(key.encode())
    return None if found is None else json.loads(found.value)


class Workload:
    """One ``python -m deployster.testing.workload`` child and its log."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    async def wait(self, timeout: float = 15.0) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"workload still running after {timeout} s:\n{self.output()}"
            ) from None

    def output(self) -> str:
        return self.log.read_text()


StartWorkload = Callable[..., Awaitable[Workload]]


@pytest.fixture
async def start_workload(tmp_path: Path) -> AsyncIterator[StartWorkload]:
    started: list[Workload] = []

    async def start(**env: str) -> Workload:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYSTER_")}
        child_env.pop("COREOS_PRIVATE_IPV4", None)
        child_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )
        child_env.update(env)
        log = tmp_path / f"workload-{len(started)}.log"
        with open(log, "wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "deployster.testing.workload",
                env=child_env,
                stdout=out,
                stderr=out,
            )
        workload = Workload(process, log)
        started.append(workload)
        return workload

    yield start
    for workload in started:
        if workload.process.returncode is None:
            workload.process.kill()
            await workload.process.wait()


def identity_env(etcd_endpoint: str, key: str, **extra: str) -> dict[str, str]:
    return {
        "DEPLOYSTER_SERVICE": "hello",
        "DEPLOYSTER_VERSION": "v1",
        "DEPLOYSTER_INSTANCE": "2",
        "DEPLOYSTER_UNIT": "hello:v1:2015.03.02-00.31.45@2.service",
        "DEPLOYSTER_MACHINE": MACHINE,
        "DEPLOYSTER_ETCD": etcd_endpoint,
        "DEPLOYSTER_ANNOUNCE_KEY": key,
        **extra,
    }


async def announced(
    client: aetcd.Client, key: str, workload: Workload, timeout: float = 10.0
) -> dict[str, str]:
    async def probe() -> dict[str, str] | None:
        if workload.process.returncode is not None:
            code = workload.process.returncode
            raise AssertionError(f"workload exited with {code}:\n{workload.output()}")
        return await read_key(client, key)

    return await eventually(probe, timeout=timeout)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_announces_serves_and_withdraws(
    etcd_endpoint: str,
    etcd_client: aetcd.Client,
    prefix: str,
    start_workload: StartWorkload,
    signum: int,
) -> None:
    key = f"{prefix}/instances/hello/v1:2015.03.02-00.31.45/2"
    workload = await start_workload(**identity_env(etcd_endpoint, key))

    announcement = await announced(etcd_client, key, workload)

    assert set(announcement) == {"url", "machine", "unit"}
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", announcement["url"])
    assert announcement["machine"] == MACHINE
    assert announcement["unit"] == "hello:v1:2015.03.02-00.31.45@2.service"
    async with aiohttp.ClientSession() as http:
        async with http.get(announcement["url"] + "/") as root:
            assert root.status == 200
            assert await root.json() == {
                "service": "hello",
                "version": "v1",
                "instance": 2,
                "unit": "hello:v1:2015.03.02-00.31.45@2.service",
            }
        async with http.get(announcement["url"] + "/health") as health:
            assert health.status == 200
            assert await health.json() == {"status": "ok"}

    workload.process.send_signal(signum)

    assert await workload.wait() == 0, workload.output()
    assert await read_key(etcd_client, key) is None


async def test_a_stale_copy_stopping_late_keeps_the_live_announcement(
    etcd_endpoint: str, etcd_client: aetcd.Client, prefix: str, start_workload: StartWorkload
) -> None:
    """Two processes of one instance (an orphan beside its fresh copy): the one that stops
    deletes only its own announcement, never the one that serves now."""
    key = f"{prefix}/instances/hello/v1:2015.03.02-00.31.45/3"
    stale = await start_workload(**identity_env(etcd_endpoint, key))
    stale_url = (await announced(etcd_client, key, stale))["url"]
    live = await start_workload(**identity_env(etcd_endpoint, key))

    async def replaced() -> dict[str, str] | None:
        found = await read_key(etcd_client, key)
        return found if found and found["url"] != stale_url else None

    live_url = (await eventually(replaced, timeout=10.0))["url"]
    stale.process.send_signal(signal.SIGTERM)
    assert await stale.wait() == 0, stale.output()
    assert (await read_key(etcd_client, key) or {}).get("url") == live_url
    live.process.send_signal(signal.SIGTERM)
    assert await live.wait() == 0, live.output()
    assert await read_key(etcd_client, key) is None


async def test_failing_health(
    etcd_endpoint: str, etcd_client: aetcd.Client, prefix: str, start_workload: StartWorkload
) -> None:
    key = f"{prefix}/instances/hello/v1:2015.03.02-00.31.45/2"
    workload = await start_workload(
        **identity_env(etcd_endpoint, key, DEPLOYSTER_WORKLOAD_HEALTH="fail")
    )
    url = (await announced(etcd_client, key, workload))["url"]

    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/health") as health:
            assert health.status == 503
            assert await health.json() == {"status": "fail"}
        async with http.get(url + "/") as root:
            assert root.status == 200


async def test_startup_delay_delays_the_announcement(
    etcd_endpoint: str, etcd_client: aetcd.Client, prefix: str, start_workload: StartWorkload
) -> None:
    key = f"{prefix}/instances/hello/v1:2015.03.02-00.31.45/2"
    started = time.monotonic()
    workload = await start_workload(
        **identity_env(etcd_endpoint, key, DEPLOYSTER_WORKLOAD_STARTUP_DELAY="1")
    )

    await announced(etcd_client, key, workload, timeout=15.0)

    assert time.monotonic() - started >= 1.0


async def test_stop_withdraws_first_then_finishes_in_flight_requests(
    etcd_endpoint: str, etcd_client: aetcd.Client, prefix: str, start_workload: StartWorkload
) -> None:
    key = f"{prefix}/instances/hello/v1:2015.03.02-00.31.45/2"
    workload = await start_workload(**identity_env(etcd_endpoint, key))
    url = (await announced(etcd_client, key, workload))["url"]

    async with aiohttp.ClientSession() as http:
        # /slow sends its headers at once: once they are here, the request is in flight.
        async with http.get(url + "/slow", params={"seconds": "2"}) as slow:
            assert slow.status == 200
            workload.process.send_signal(signal.SIGTERM)

            async def withdrawn() -> bool:
                return await read_key(etcd_client, key) is None

            await eventually(withdrawn, timeout=5.0)
            assert workload.process.returncode is None, "exited before the request finished"

            body = await slow.json(content_type=None)
        assert body["service"] == "hello"

    assert await workload.wait() == 0, workload.output()


async def test_invalid_settings_exit_non_zero(start_workload: StartWorkload) -> None:
    workload = await start_workload(DEPLOYSTER_WORKLOAD_STARTUP_DELAY="soon")

    assert await workload.wait() == 2
    assert "DEPLOYSTER_WORKLOAD_STARTUP_DELAY='soon' is not valid" in workload.output()


# --- the docker unit's scripts -------------------------------------------------------


def systemd_argv(value: str, unit: UnitName) -> list[str]:
    """An Exec value as systemd hands it to execve: specifiers, then words, then ``$``.

    Every ``$`` in Deployster's scripts is meant for the shell, so anything systemd would
    expand itself (``$VAR``, ``${VAR}``) is an error here rather than a silent substitution.
    """
    specifiers = {"%": "%", "m": MACHINE, "n": str(unit), "i": str(unit.instance)}
    expanded = re.sub(r"%(.)", lambda m: specifiers[m.group(1)], value)

    def dollar(match: re.Match[str]) -> str:
        if match.group(0) != "$$":
            raise AssertionError(f"systemd would expand {match.group(0)} in {value!r}")
        return "$"

    return [
        re.sub(r"\$\$|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", dollar, word)
        for word in shlex.split(expanded)
    ]


@pytest.fixture
def fake_docker(tmp_path: Path) -> Path:
    """A ``docker`` that answers ``port`` as Docker does once a port is published.

    It fails its first two ``port`` calls (the container is still starting), then prints
    Docker's two-line answer (``docker port`` output, Docker CLI reference); it records
    every call.
    """
    script = tmp_path / "docker"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/docker.calls\n'
        'if [ "$1" = port ]; then\n'
        f"  n=$(cat {tmp_path}/docker.count 2>/dev/null || echo 0)\n"
        f"  echo $((n + 1)) > {tmp_path}/docker.count\n"
        f'  if [ "$n" -lt "${{FAKE_DOCKER_FAILURES:-2}}" ]; then\n'
        "    echo \"Error: No public port '$3/tcp' published for $2\" >&2; exit 1\n"
        "  fi\n"
        '  echo "0.0.0.0:49153"; echo "[::]:49153"\n'
        "fi\n"
    )
    script.chmod(0o755)
    return script


def docker_scripts(etcd_endpoint: str, key: str, unit: UnitName) -> dict[str, list[str]]:
    ctx = UnitContext(
        unit=unit,
        image="mmmhm/hello:v1",
        etcd_endpoints=etcd_endpoint,
        announce_key=key,
        env={"GREETING": "hi"},
    )
    return {
        o.name: systemd_argv(o.value, unit)
        for o in render_unit(load_template("docker"), ctx)
        if o.name in ("ExecStartPost", "ExecStop")
    }


def test_docker_scripts_are_valid_shell() -> None:
    unit = UnitName.build("hello", "v1", "2015.03.02-00.31.45", 1)
    scripts = docker_scripts("http://127.0.0.1:2379", announce_key("/deployster", unit), unit)

    assert set(scripts) == {"ExecStartPost", "ExecStop"}
    for name, argv in scripts.items():
        assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3, argv
        checked = subprocess.run(["sh", "-n", "-c", argv[2]], capture_output=True, text=True)
        assert checked.returncode == 0, f"{name}: {checked.stderr}\n{argv[2]}"


def run_script(
    argv: list[str], docker: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    etcdctl = Path(etcd_binary()).with_name("etcdctl")
    script = argv[2].replace("/usr/bin/docker", str(docker))
    script = script.replace("/usr/bin/etcdctl", str(etcdctl))
    # The unit's environment: ETCDCTL_API=3 from the unit, the rest as systemd would set it.
    base = {"PATH": os.environ["PATH"], "ETCDCTL_API": "3", **env}
    return subprocess.run(
        ["/bin/sh", "-c", script], env=base, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(("private_ip", "host"), [("10.1.2.3", "10.1.2.3"), (None, "127.0.0.1")])
async def test_docker_announce_and_withdraw_scripts(
    etcd_endpoint: str,
    etcd_client: aetcd.Client,
    prefix: str,
    fake_docker: Path,
    private_ip: str | None,
    host: str,
) -> None:
    unit = UnitName.build("hello", "v1", "2015.03.02-00.31.45", 1)
    key = announce_key(prefix, unit)
    scripts = docker_scripts(etcd_endpoint, key, unit)
    env = {"COREOS_PRIVATE_IPV4": private_ip} if private_ip else {}

    announce = await asyncio.to_thread(run_script, scripts["ExecStartPost"], fake_docker, env)

    assert announce.returncode == 0, announce.stderr
    assert await read_key(etcd_client, key) == {
        "url": f"http://{host}:49153",
        "machine": MACHINE,
        "unit": str(unit),
    }
    calls = (fake_docker.parent / "docker.calls").read_text().splitlines()
    assert calls == [f"port {unit.container} 3000"] * 3  # polled until published

    withdraw = await asyncio.to_thread(run_script, scripts["ExecStop"], fake_docker, env)

    assert withdraw.returncode == 0, withdraw.stderr
    assert await read_key(etcd_client, key) is None
    calls = (fake_docker.parent / "docker.calls").read_text().splitlines()
    assert calls[-1] == f"stop -t 30 {unit.container}"


async def test_docker_announce_gives_up_and_fails_the_unit(
    etcd_endpoint: str, etcd_client: aetcd.Client, prefix: str, fake_docker: Path
) -> None:
    unit = UnitName.build("hello", "v1", "2015.03.02-00.31.45", 1)
    key = announce_key(prefix, unit)
    argv = docker_scripts(etcd_endpoint, key, unit)["ExecStartPost"]
    # The unit waits 1200 polls (120 s); five make the same point faster.
    assert " -ge 1200 " in argv[2]
    argv = [*argv[:2], argv[2].replace(" -ge 1200 ", " -ge 5 ")]

    failed = await asyncio.to_thread(
        run_script, argv, fake_docker, {"FAKE_DOCKER_FAILURES": "1000"}
    )

    assert failed.returncode != 0
    assert f"port 3000 of {unit.container} not published" in failed.stderr
    assert await read_key(etcd_client, key) is None
