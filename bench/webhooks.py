"""Webhook benchmark: registry notification received -> the deploy's units submitted to fleet.

Starts a private etcd, localfleet (as a process, three machines) and Deployster on a loopback
port with the webhooks on, gives N services an auto-deploy policy, then sends one registry
notification (a tagged manifest push, the live-captured envelope of `docs/webhooks.md`
§2.7) per service, one after another. For each it measures the time from sending the POST to
its 202 answer, and to the ``UnitsSubmitted`` event of the deploy it started (fleet has
created and launched every unit). The units run ``/bin/sleep`` (a unit template of the
benchmark's own), so their deploys roll back after the policy's 1 s instance deadline and
clean up after themselves; what is measured ends at the submission.

    python bench/webhooks.py [--pushes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from deployster.config import Settings
from deployster.events import UnitsSubmitted
from deployster.fleet import FleetError
from deployster.launchers import EtcdServer, free_port
from deployster.policy import AutoDeployPolicy, ServicePolicy
from deployster.server import Deployster

PREFIX = "/deployster"
SECRET = secrets.token_hex(16)
TEMPLATE = """[Unit]
Description={{ description }}

[Service]
ExecStart=/bin/sleep 30
"""


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def notification(repository: str, tag: str) -> bytes:
    """The live-captured envelope (webhooks.md §2.7), retargeted."""
    event = {
        "id": secrets.token_hex(16),
        "timestamp": "2026-11-26T11:07:16.127186852Z",
        "action": "push",
        "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "size": 348,
            "digest": f"sha256:{secrets.token_hex(32)}",
            "length": 348,
            "repository": repository,
            "url": f"http://127.0.0.1:5000/v2/{repository}/manifests/sha256:0",
            "tag": tag,
        },
        "request": {
            "id": secrets.token_hex(8),
            "addr": "127.0.0.1:54454",
            "host": "127.0.0.1:5000",
            "method": "PUT",
            "useragent": "skopeo/1.9.3",
        },
        "actor": {},
        "source": {"addr": "vm:5000", "instanceID": secrets.token_hex(8)},
    }
    return json.dumps({"events": [event]}).encode()


async def main(pushes: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    work = Path(tempfile.mkdtemp(prefix="deployster-bench-webhooks-"))
    etcd = EtcdServer(work / "etcd")
    etcd.start(log_path=work / "etcd.log")
    etcd.wait_ready()
    fleet_port = free_port()
    with open(work / "localfleet.log", "wb") as out:
        fleet = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployster",
                "localfleet",
                "--listen",
                f"127.0.0.1:{fleet_port}",
                "--machines",
                "3",
                "--state-dir",
                str(work / "fleet"),
            ],
            stdout=out,
            stderr=out,
        )
    (work / "sleep.service").write_text(TEMPLATE)
    port = free_port()
    settings = Settings(
        etcd=etcd.endpoint,
        etcd_prefix=PREFIX,
        fleet_endpoint=f"http://127.0.0.1:{fleet_port}",
        template=str(work / "sleep.service"),
        password=secrets.token_hex(8),
        router="vulcand",
        vulcand_settle=0,
        webhook_secret=SECRET,
        listen=f"127.0.0.1:{port}",
    )  # type: ignore[arg-type]
    deployster = None
    runner = None
    try:
        deployster = await Deployster.connect(settings)
        runner = web.AppRunner(deployster.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await deployster.start()
        submitted: dict[str, float] = {}
        arrived: dict[str, asyncio.Event] = {}

        async def on_submitted(event: UnitsSubmitted) -> None:
            submitted[event.service] = time.perf_counter()
            arrived.setdefault(event.service, asyncio.Event()).set()

        deployster.bus.subscribe(UnitsSubmitted, on_submitted)
        policy = ServicePolicy(
            instance_deadline=1,
            deploy_deadline=5,
            drain=0,
            instance_count=1,
            auto_deploy=AutoDeployPolicy(enabled=True, policy="all"),
        )
        services = [f"bench-{n}" for n in range(pushes)]
        for service in services:
            await deployster.store.save_policy(service, policy)
        url = f"http://127.0.0.1:{port}/v1/webhooks/registry"
        headers = {
            "Content-Type": "application/vnd.docker.distribution.events.v1+json",
            "Authorization": f"Bearer {SECRET}",
        }
        for _ in range(100):  # until localfleet answers
            try:
                await deployster.fleet.list_units()
                break
            except FleetError:
                await asyncio.sleep(0.1)
        answered, total = [], []
        async with aiohttp.ClientSession() as session:
            for service in services:
                done = arrived.setdefault(service, asyncio.Event())
                body = notification(f"deployster/{service}", "v1.0.0")
                start = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    decision = (await resp.json())["decisions"][0]
                    answered.append(time.perf_counter() - start)
                assert resp.status == 202 and decision["decision"] == "queued", decision
                await asyncio.wait_for(done.wait(), 30)
                total.append(submitted[service] - start)
        print(f"{pushes} registry push notifications, one after another, each for its own service")
        print(f"{'':<34}{'p50 ms':>9}{'p99 ms':>9}")
        print(
            f"{'webhook received -> 202 answer':<34}{pct(answered, 50):>9.2f}{pct(answered, 99):>9.2f}"
        )
        print(
            f"{'webhook received -> units submitted':<34}{pct(total, 50):>9.2f}{pct(total, 99):>9.2f}"
        )
    finally:
        if runner is not None:
            await runner.cleanup()
        if deployster is not None:
            await deployster.close()
        fleet.terminate()
        fleet.wait(60)
        etcd.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=200)
    asyncio.run(main(parser.parse_args().pushes))
