"""Reaction benchmark: instance announcement in etcd -> server key in the router's layout.

Starts a private etcd and one small HTTP server that answers the health check, then runs
Deployster's instances handler (resumable watch -> health probe -> router registration) with
the vulcand router, and announces N instances one after another. For each it measures the
time from the announcement's put to the moment the router's server key exists (seen through
an etcd watch), and the health probe's own duration, and prints p50/p99 of both and of their
difference (the reaction beyond the probe).

    python bench/reaction.py [--instances 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import structlog
from aiohttp import web

from deployster import etcd as etcd_adapter
from deployster.bus import EventBus
from deployster.keys import announce_key
from deployster.launchers import EtcdServer, free_port
from deployster.naming import UnitName
from deployster.policy import HealthPolicy, ServicePolicy
from deployster.routers import VulcandRouter
from deployster.store import Store
from handlers.instances import InstancesHandler

PREFIX = "/deployster"
SERVICE = "reaction"


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def main(count: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    server = EtcdServer(Path(tempfile.mkdtemp(prefix="deployster-reaction-")))
    server.start()
    server.wait_ready()
    app = web.Application()
    app.router.add_get("/health", lambda _: web.json_response({"status": "ok"}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    etcd = etcd_adapter.client(server.endpoint)
    watcher = etcd_adapter.client(server.endpoint)
    try:
        store = Store(etcd, PREFIX)
        await store.save_policy(SERVICE, ServicePolicy(health=HealthPolicy(healthy_threshold=1)))
        router = VulcandRouter(etcd, prefix="vulcand", settle=0)
        instances = InstancesHandler(
            EventBus(), etcd=etcd, store=store, router=router, prefix=PREFIX
        )
        await instances.start()

        appeared: dict[str, float] = {}
        arrivals: dict[str, asyncio.Event] = {}

        async def on_key(event: etcd_adapter.WatchEvent) -> None:
            if event.kind == "put":
                server_id = event.key.rsplit("/", 1)[1]
                appeared[server_id] = time.perf_counter()
                arrivals.setdefault(server_id, asyncio.Event()).set()

        async def ignore(snapshot: dict[str, str], revision: int) -> None:
            return None

        key_watch = asyncio.create_task(
            etcd_adapter.watch_prefix(watcher, "vulcand/backends/", on_key, ignore)
        )
        await asyncio.sleep(0.5)
        total, probes = [], []
        for n in range(1, count + 1):
            unit = UnitName(SERVICE, "v1", "2026.11.26-00.00.00", n)
            arrived = arrivals.setdefault(unit.container, asyncio.Event())
            value = json.dumps({"url": url, "machine": "m", "unit": str(unit)})
            start = time.perf_counter()
            await etcd.put(announce_key(PREFIX, unit).encode(), value.encode())
            await asyncio.wait_for(arrived.wait(), 10)
            total.append(appeared[unit.container] - start)
            instance = instances.get(unit)
            assert instance is not None and instance.last_probe is not None
            probes.append(instance.last_probe.duration)
        key_watch.cancel()
        beyond = [t - p for t, p in zip(total, probes, strict=True)]
        print(f"{count} instances announced one after another")
        print(f"{'':<28}{'p50 ms':>9}{'p99 ms':>9}")
        print(f"{'announcement -> router key':<28}{pct(total, 50):>9.2f}{pct(total, 99):>9.2f}")
        print(f"{'health probe itself':<28}{pct(probes, 50):>9.2f}{pct(probes, 99):>9.2f}")
        print(f"{'beyond the probe':<28}{pct(beyond, 50):>9.2f}{pct(beyond, 99):>9.2f}")
        await instances.close()
    finally:
        await etcd.close()
        await watcher.close()
        await runner.cleanup()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    asyncio.run(main(parser.parse_args().instances))
