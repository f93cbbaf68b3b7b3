"""Scale benchmark: a fleet of N running, announced units and 1,000 services with full history.

For each size it starts a private etcd and a localfleet (3 machines) whose registry the
benchmark writes straight into localfleet's database (N units, launched, placed round-robin,
ExecStart a real ``sleep``: every unit is a running process that localfleet supervises and
reports ``active``/``running``). It writes 1,000 services' deploy records (10 each, finished,
each about the size of a 10-instance deploy's) and one announcement per unit, pointing at one
small health server in its own process. Then it starts Deployster in this process (the vulcand
router layout, no router process needed), runs the server's first reconcile pass (as its loop
does one interval after the start: it fills the fleet view and freezes the settled heap) and
prints:

- units of one service (``GET /v1/services/{name}/units``), ``GET /v1/services``;
- one reconcile pass of the reaper, and the event loop's worst lag during it (a sampler
  task sleeping 1 ms at a time records how late it wakes);
- ``POST /v1/services/{name}/deploys`` to 201 (one new instance; fleet's PUT included), and
  fleet's two PUTs of one unit alone (localfleet's share of it);
- indexing the records once, as the first start after an upgrade does (in the seeding child);
- a start of the server (connect + ``start()``: the index of unfinished deploys, no record);
- the process's RSS after all that (the benchmark's own: four servers ran in it, and its
  fixtures), and the RSS of one server run alone in a child process (``--server``: connect,
  ``start()``, every instance probed and routed, the first reconcile pass);
- and, as the reference, the 2015 server's way of answering a units request: every unit
  and every unit state of fleet, listed page by page.

Times are min / median of ``--runs`` (default 3), in milliseconds.

    python bench/scale.py [--sizes 100,1000,10000] [--runs 3]
    python bench/scale.py --server ETCD FLEET UNITS [--trace FRAMES]  # against a seeded etcd
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aetcd
import aiohttp
import structlog
from aiohttp import web

from deployster import keys
from deployster.config import Settings
from deployster.etcd import client as etcd_client
from deployster.fleet import UnitOption
from deployster.keys import announce_key
from deployster.launchers import EtcdServer, free_port
from deployster.localfleet.server import machine_id
from deployster.localfleet.store import RegistryStore, StoredUnit
from deployster.naming import UnitName
from deployster.policy import HealthPolicy, ServicePolicy
from deployster.records import DeployRecord, DeployState
from deployster.server import Deployster
from deployster.store import Store
from deployster.units import Announcement
from handlers.deploys import DeployConfig

PREFIX = "/deployster"
SERVICES = 1000
HISTORY = 10
MACHINES = 3
PASSWORD = "bench"
HEALTH_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_get("/health", lambda _: web.Response(text="ok"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def service_name(n: int) -> str:
    return f"svc{n:04d}"


def unit_names(count: int) -> list[UnitName]:
    """``count`` units over the 1,000 services' live releases (at least one per service)."""
    return [
        UnitName(service_name(n % SERVICES), "v10", "2026.01.01-00.00.10", n // SERVICES + 1)
        for n in range(count)
    ]


def write_registry(state_dir: Path, units: list[UnitName]) -> None:
    """localfleet's database with ``units`` launched and placed, as if submitted through PUTs."""
    machines = [machine_id(os.uname().nodename, i) for i in range(MACHINES)]
    # No start timeout: on a busy machine 10,000 processes starting at once may take longer
    # than systemd's 90 s default, and a unit that failed is not what is measured.
    options = (
        UnitOption(section="Service", name="ExecStart", value="/bin/sleep infinity"),
        UnitOption(section="Service", name="TimeoutStartSec", value="0"),
    )
    RegistryStore(state_dir).write(
        {
            str(u): StoredUnit(
                name=str(u), options=options, desired_state="launched", target=machines[i % 3]
            )
            for i, u in enumerate(units)
        }
    )


def record(service: str, n: int) -> DeployRecord:
    r = DeployRecord(
        id=f"20260101-0000{n:02d}-{service}",
        service=service,
        version=f"v{n}",
        timestamp=f"2026.01.01-00.00.{n:02d}",
        instance_count=10,
        destroy_previous=True,
        state=DeployState.SUCCEEDED,
        created_at=EPOCH + timedelta(seconds=n),
        units=[f"{service}:v{n}:2026.01.01-00.00.{n:02d}@{i}.service" for i in range(1, 11)],
    )
    for i in range(1, 11):
        for kind in ("submitted", "instance_ready", "routed", "retiring"):
            r.note(kind, f"instance {i} of {service} v{n}: {kind}", unit=r.units[i - 1])
    return r


async def seed(endpoint: str, count: int, health_url: str) -> None:
    """The records, policies and announcements, written by a child process (``--seed``) so
    that the memory they take here is not counted in the server's RSS. They are written as a
    version without the index of unfinished deploys wrote them; the child then indexes them
    as the first start after an upgrade does, once, and says how long that took."""
    async with etcd_client(endpoint) as etcd:
        store = Store(etcd, PREFIX)
        await write_etcd(etcd, store, unit_names(count), health_url)
        started = time.perf_counter()
        await store.index_unfinished()
        print(
            f"indexing the records once (upgrade)    {(time.perf_counter() - started) * 1000:8.1f} ms"
        )


async def write_etcd(
    etcd: aetcd.Client, store: Store, units: list[UnitName], health_url: str
) -> None:
    txn = etcd.transactions
    puts = []
    policy = ServicePolicy(health=HealthPolicy(interval=60, healthy_threshold=1))
    for s in range(SERVICES):
        service = service_name(s)
        puts.append(
            txn.put(
                keys.policy_key(store.prefix, service).encode(), policy.model_dump_json().encode()
            )
        )
        for n in range(1, HISTORY + 1):
            r = record(service, n)
            puts.append(
                txn.put(
                    keys.deploy_key(store.prefix, service, r.id).encode(),
                    r.model_dump_json().encode(),
                )
            )
    for i, u in enumerate(units):
        a = Announcement(
            url=health_url, machine=machine_id(os.uname().nodename, i % 3), unit=str(u)
        )
        puts.append(txn.put(announce_key(PREFIX, u).encode(), a.model_dump_json().encode()))
    for start in range(0, len(puts), 100):
        await etcd.transaction(compare=[], success=puts[start : start + 100], failure=[])


async def wait_running(session: aiohttp.ClientSession, fleet: str, count: int) -> float:
    started = time.monotonic()
    while True:
        running, token = 0, None
        while True:
            params = {"nextPageToken": token} if token else {}
            async with session.get(f"{fleet}/fleet/v1/state", params=params) as resp:
                page = await resp.json()
            running += sum(s["systemdActiveState"] == "active" for s in page.get("states", []))
            token = page.get("nextPageToken")
            if not token:
                break
        if running >= count:
            return time.monotonic() - started
        if time.monotonic() - started > 600:
            raise RuntimeError(f"only {running} of {count} units running after 600 s")
        await asyncio.sleep(1)


async def all_routed(dep: Deployster, count: int) -> float:
    """Seconds until the server has probed and routed every announced instance: the figures
    are taken after that, not during the start's burst of probes and router writes."""
    started = time.monotonic()
    while True:
        instances = dep.instances._instances.values()
        if sum(i.routed for i in instances) >= count:
            return time.monotonic() - started
        if time.monotonic() - started > 300:
            raise RuntimeError(f"only {sum(i.routed for i in instances)} of {count} routed")
        await asyncio.sleep(0.5)


class LagSampler:
    """The event loop's worst lateness while it runs: a 1 ms sleep that wakes late means
    something held the loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_gc = 0.0  # the longest collection of Python's cyclic garbage collector
        self._gc_started = 0.0
        self._task: asyncio.Task[None] | None = None

    def _on_gc(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.worst_gc = max(self.worst_gc, time.perf_counter() - self._gc_started)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - before - 0.001)

    def __enter__(self) -> LagSampler:
        self._task = asyncio.create_task(self._run())
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        gc.callbacks.remove(self._on_gc)


async def timed(runs: int, action: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await action()
        times.append(time.perf_counter() - started)
    return times


def server_settings(etcd: str, fleet: str) -> tuple[Settings, DeployConfig]:
    settings = Settings(
        etcd=etcd,
        fleet_endpoint=fleet,
        template="workload",
        password=PASSWORD,
        router="vulcand",
        vulcand_settle=0,
        reconcile_interval=3600,  # the pass is run by hand
    )  # type: ignore[call-arg]
    config = DeployConfig(image_prefix="deployster", etcd_endpoints=etcd, etcd_prefix=PREFIX)
    return settings, config


def rss_mib() -> float:
    """This process's resident memory now (the seeding before the server started is in it
    too, as far as Python gave that memory back)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fmt(times: list[float]) -> str:
    return f"{min(times) * 1000:8.1f} / {statistics.median(times) * 1000:8.1f} ms"


def start_children(work: Path, fleet_port: int, health_port: int) -> list[subprocess.Popen[bytes]]:
    localfleet = [sys.executable, "-m", "deployster", "localfleet"]
    localfleet += ["--listen", f"127.0.0.1:{fleet_port}", "--machines", str(MACHINES)]
    localfleet += ["--state-dir", str(work / "localfleet")]
    with open(work / "localfleet.log", "wb") as log:
        return [
            subprocess.Popen(localfleet, stdout=subprocess.DEVNULL, stderr=log),
            subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(health_port)]),
        ]


async def one_size(count: int, runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"deployster-scale-{count}-"))
    write_registry(work / "localfleet", unit_names(count))
    etcd = EtcdServer(work / "etcd")
    etcd.start(log_path=work / "etcd.log")
    etcd.wait_ready()
    fleet_port, health_port, app_port = free_port(), free_port(), free_port()
    children = start_children(work, fleet_port, health_port)
    fleet = f"http://127.0.0.1:{fleet_port}"
    settings, config = server_settings(etcd.endpoint, fleet)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{fleet}/fleet/v1/machines") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            ready = await wait_running(session, fleet, count)
            print(f"\n== {count:,} units running ({ready:.0f} s to start them) ==")

            seeding = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--seed",
                etcd.endpoint,
                str(count),
                f"http://127.0.0.1:{health_port}",
            )
            assert await seeding.wait() == 0

            start_times = []
            for _ in range(runs):
                started = time.perf_counter()
                dep = await Deployster.connect(settings, config)
                await dep.start()
                start_times.append(time.perf_counter() - started)
                await dep.close()
            dep = await Deployster.connect(settings, config)
            await dep.start()
            settled = await all_routed(dep, count)
            print(f"(every instance probed and routed {settled:.0f} s after the server started)")
            runner = web.AppRunner(dep.app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", app_port).start()
            api = f"http://127.0.0.1:{app_port}"
            auth = {"Authorization": aiohttp.encode_basic_auth("deployster", PASSWORD)}

            async def get(path: str) -> None:
                async with session.get(f"{api}{path}", headers=auth) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()

            services = {service_name(s) for s in range(SERVICES)}
            # The server's first pass (its loop runs one `interval` after the start): it fills
            # the fleet view and freezes the settled heap; what is measured comes after it.
            await dep.reaper.reconcile(services)
            one = await timed(runs, lambda: get(f"/v1/services/{service_name(0)}/units"))
            every = await timed(runs, lambda: get("/v1/services"))
            reference = await timed(
                runs, lambda: asyncio.gather(dep.fleet.list_units(), dep.fleet.list_states())
            )
            passes, lags, gcs = [], [], []
            for _ in range(runs):
                with LagSampler() as lag:
                    started = time.perf_counter()
                    await dep.reaper.reconcile(services)
                    passes.append(time.perf_counter() - started)
                lags.append(lag.worst)
                gcs.append(lag.worst_gc)
            posts = []
            for n in range(runs):
                body = {"deploy": {"version": "new", "instance_count": 1}}
                started = time.perf_counter()
                async with session.post(
                    f"{api}/v1/services/fresh{n}/deploys", json=body, headers=auth
                ) as resp:
                    assert resp.status == 201, await resp.text()
                posts.append(time.perf_counter() - started)
            puts = []
            for n in range(runs):  # what fleet itself takes of a POST: its two PUTs of a unit
                unit = f"putonly{n}:v1:2026.01.01-00.00.00@1.service"
                options = [UnitOption(section="Service", name="ExecStart", value="/bin/true")]
                started = time.perf_counter()
                await dep.fleet.create_unit(unit, options)
                await dep.fleet.set_desired_state(unit, "launched")
                puts.append(time.perf_counter() - started)
                await dep.fleet.destroy_unit(unit)
            tracked, frozen = len(gc.get_objects()), gc.get_freeze_count()
            gc.collect()
            rss = rss_mib()
            print(f"units of one service (GET .../units)  {fmt(one)}")
            print(f"GET /v1/services (1,000 services)      {fmt(every)}")
            print(f"one reconcile pass                     {fmt(passes)}")
            print(f"event loop's worst lag during a pass   {fmt(lags)}")
            print(f"  of which the longest GC collection   {fmt(gcs)}")
            print(f"POST to 201                            {fmt(posts)}")
            print(f"  fleet's two PUTs of a unit alone     {fmt(puts)}")
            print(f"a start of the server                  {fmt(start_times)}")
            print(f"this process's RSS after the above     {rss:8.0f} MiB")
            print(f"objects the collector walks / frozen   {tracked:8,} / {frozen:,}")
            print(f"reference: all units + states (2015)   {fmt(reference)}")
            await runner.cleanup()
            await dep.close()
            alone = await measure_alone(etcd.endpoint, fleet, count)
            print(
                "the server alone in a process, RSS    "
                f"{alone['pass']:8.0f} MiB (after connect {alone['connect']:.0f}, start "
                f"{alone['start']:.0f}, every instance routed {alone['routed']:.0f})"
            )
    finally:
        # Stopping 10,000 units one by one is not what is measured: localfleet is killed and
        # the processes it noted are killed after it.
        for child in children:
            child.kill()
            child.wait()
        store = RegistryStore(work / "localfleet")
        for run in store.runs().values():
            for group in run.groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        store.close()
        etcd.stop()


async def lone_server(etcd: str, fleet: str, count: int, trace: int) -> None:
    """One server in a process of its own (``--server``): its RSS at each stage, one line
    each, after connect, after ``start()``, once every instance is probed and routed, and
    after the first reconcile pass (it fills the fleet view and freezes the heap). With
    ``trace`` > 0, tracemalloc follows that many frames and the lines that allocated most
    between the stages are printed too (tracemalloc's own memory is in the RSS then)."""
    if trace:
        tracemalloc.start(trace)
    snapshots: list[tracemalloc.Snapshot] = []

    def stage(name: str) -> None:
        gc.collect()
        print(f"{name} {rss_mib():.0f}", flush=True)
        if trace:
            snapshots.append(tracemalloc.take_snapshot())
            if len(snapshots) > 1:
                diff = snapshots[-1].compare_to(snapshots[-2], "traceback")
                for stat in diff[:12]:
                    where = " <- ".join(
                        f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback[:trace]
                    )
                    print(f"#   {stat.size_diff / 2**20:+7.1f} MiB {stat.count_diff:+8,} {where}")

    stage("started")
    settings, config = server_settings(etcd, fleet)
    dep = await Deployster.connect(settings, config)
    stage("connect")
    await dep.start()
    stage("start")
    await all_routed(dep, count)
    stage("routed")
    services = {service_name(s) for s in range(SERVICES)}
    await dep.reaper.reconcile(services)
    stage("pass")
    await dep.close()


async def measure_alone(etcd: str, fleet: str, count: int) -> dict[str, float]:
    """:func:`lone_server` in a child process: its RSS in MiB by stage."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--server",
        etcd,
        fleet,
        str(count),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate()
    assert child.returncode == 0, out
    lines = (line.split() for line in out.decode().splitlines() if not line.startswith("#"))
    return {name: float(mib) for name, mib in lines}


def quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


async def main(sizes: list[int], runs: int) -> None:
    quiet()
    for count in sizes:
        await one_size(count, runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--seed", nargs=3, metavar=("ETCD", "UNITS", "HEALTH_URL"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--server",
        nargs=3,
        metavar=("ETCD", "FLEET", "UNITS"),
        help="run one server against a seeded etcd and fleet, print its RSS by stage",
    )
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="FRAMES",
        help="with --server: also print what tracemalloc saw allocated between stages",
    )
    args = parser.parse_args()
    if args.seed:
        asyncio.run(seed(args.seed[0], int(args.seed[1]), args.seed[2]))
    elif args.server:
        quiet()
        asyncio.run(lone_server(args.server[0], args.server[1], int(args.server[2]), args.trace))
    else:
        asyncio.run(main([int(s) for s in args.sizes.split(",")], args.runs))
