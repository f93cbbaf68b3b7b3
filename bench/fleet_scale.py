"""localfleet and the fleet client at scale: placement of one unit, listings, the client's decoding.

For each size N it writes localfleet's registry database straight (N units desired
``loaded``, as ``docker.service`` makes them: ``svcNNNN:v1:<timestamp>@<i>.service`` with
``Conflicts=`` on their release, 3 instances a release, 3 machines, placed one instance per
machine), starts localfleet on it (its own process, a state directory, so every PUT is a
committed SQLite transaction) and prints:

- localfleet's start (process start to the first answer, with N units to place and load);
- ``--puts`` rounds of what a deploy asks of fleet for one new unit, each round timed call
  by call, min / median / p99: ``PUT /units/{name}`` with options and desired state
  ``loaded`` (placed at once, 201), ``PUT`` of desired state ``launched`` (204; the unit
  runs ``sleep``), then ``DELETE`` (204; localfleet stops it after answering);
- every unit and every unit state listed through `deployster.fleet.FleetClient` (pages of
  100, min / median of ``--runs``), and the CPU this process (the client) spent on it;
- of that, the decoding alone: the pages fetched once as text, then `decode_page` over them
  (min of ``--runs``).

With ``--running``, the N units are desired ``launched`` instead, each a real ``sleep``
process that localfleet supervises (its pipe, its journal, its state reports), and the
figures are taken once every one of them reports ``active``: the load deploys meet.
localfleet is then killed (SIGKILL) and the processes it noted with it, since stopping ten
thousand units one by one is not what is measured.

With ``--submit``, it also times submitting the N units one by one to an empty localfleet
(one PUT each, options and desired state ``loaded``, as in the registry above).

    python bench/fleet_scale.py [--sizes 100,1000,10000] [--puts 50] [--runs 3] [--running]
                                [--submit]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from deployster.fleet import FleetClient, UnitOption, UnitPage, UnitStatePage, decode_page
from deployster.launchers import free_port
from deployster.localfleet.server import machine_id
from deployster.localfleet.store import RegistryStore, StoredUnit

MACHINES = 3
INSTANCES = 3  # a release's instances conflict with each other: one per machine


def release(n: int) -> str:
    return f"svc{n:04d}:v1:2026.01.01-00.00.{n % 60:02d}"


def options(rel: str) -> tuple[UnitOption, ...]:
    # No start timeout: on a busy machine ten thousand processes starting at once may take
    # longer than systemd's 90 s default, and a unit that failed is not what is measured.
    return (
        UnitOption(section="Service", name="ExecStart", value="/bin/sleep infinity"),
        UnitOption(section="Service", name="TimeoutStartSec", value="0"),
        UnitOption(section="X-Fleet", name="Conflicts", value=f"{rel}@*.service"),
    )


def write_registry(state_dir: Path, count: int, desired_state: str) -> None:
    machines = sorted(machine_id(os.uname().nodename, i) for i in range(MACHINES))
    units = {}
    for n in range(count):
        rel = release(n // INSTANCES)
        name = f"{rel}@{n % INSTANCES + 1}.service"
        units[name] = StoredUnit(
            name=name,
            options=options(rel),
            desired_state=desired_state,
            target=machines[n % INSTANCES],
        )
    store = RegistryStore(state_dir)
    store.write(units)
    store.close()


def fmt(times: list[float]) -> str:
    return f"{min(times) * 1000:9.1f} / {statistics.median(times) * 1000:9.1f} ms (min / median)"


def p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def spread(times: list[float]) -> str:
    return (
        f"{min(times) * 1000:7.2f} / {statistics.median(times) * 1000:7.2f} / "
        f"{p99(times) * 1000:7.2f} ms (min / median / p99 of {len(times)})"
    )


async def timed(
    runs: int, action: Callable[[], Awaitable[object]]
) -> tuple[list[float], list[float]]:
    """Wall times and this process's CPU times of `runs` calls."""
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        await action()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu


async def raw_pages(session: aiohttp.ClientSession, url: str) -> list[str]:
    pages: list[str] = []
    params: dict[str, str] = {}
    while True:
        async with session.get(url, params=params) as resp:
            resp.raise_for_status()
            pages.append(await resp.text())
        token = json.loads(pages[-1]).get("nextPageToken")
        if not token:
            return pages
        params = {"nextPageToken": token}


def decode_cpu(runs: int, page_type: type[UnitPage | UnitStatePage], pages: list[str]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        for text in pages:
            decode_page(page_type, text)
        best = min(best, time.process_time() - start)
    return best


async def wait_listening(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, "localfleet exited"
            try:
                async with session.get(url + "/fleet/v1/machines") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def settled(fleet: FleetClient, count: int, running: bool) -> None:
    """Wait until the agent has loaded every unit (and, with `running`, every one is active)."""
    for _ in range(6000):
        states = await fleet.list_states()
        active = [state for state in states if state.active_state == "active"]
        ready = len(active) if running else len(states)
        if ready >= count:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"localfleet did not settle {count} units")


async def deploy_rounds(
    session: aiohttp.ClientSession, url: str, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    """What a deploy asks of fleet for one new unit, round after round, each call timed: create
    it (201), launch it (204), destroy it (204)."""
    creates, launches, deletes = [], [], []
    for k in range(rounds):
        rel = release(100_000 + k)
        name = f"{rel}@1.service"
        unit_url = f"{url}/fleet/v1/units/{name}"
        body = {
            "name": name,
            "desiredState": "loaded",
            "options": [o.to_wire() for o in options(rel)],
        }
        for times, method, payload, status in (
            (creates, "PUT", body, 201),
            (launches, "PUT", {"name": name, "desiredState": "launched"}, 204),
            (deletes, "DELETE", None, 204),
        ):
            start = time.perf_counter()
            async with session.request(method, unit_url, json=payload) as resp:
                assert resp.status == status, await resp.text()
            times.append(time.perf_counter() - start)
    return creates, launches, deletes


async def one_size(count: int, puts: int, runs: int, running: bool, submit: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"deployster-fleet-scale-{count}-"))
    write_registry(work / "localfleet", count, "launched" if running else "loaded")
    if submit:
        await submit_one_by_one(count, work / "empty")
    started = time.perf_counter()
    url, process = await start_localfleet(work / "localfleet")
    start_time = time.perf_counter() - started
    try:
        async with FleetClient(url) as fleet, aiohttp.ClientSession() as session:
            await settled(fleet, count, running)
            settle_time = time.perf_counter() - started
            creates, launches, deletes = await deploy_rounds(session, url, puts)
            assert len(await fleet.list_units()) == count
            unit_lists, unit_list_cpu = await timed(runs, fleet.list_units)
            state_lists, state_list_cpu = await timed(runs, fleet.list_states)
            unit_cpu = decode_cpu(runs, UnitPage, await raw_pages(session, f"{url}/fleet/v1/units"))
            state_cpu = decode_cpu(
                runs, UnitStatePage, await raw_pages(session, f"{url}/fleet/v1/state")
            )
        print(f"\n== {count} units{' running' if running else ''} ==")
        print(f"localfleet start to first answer       {start_time * 1000:9.1f} ms")
        print(
            f"  to every unit {'active' if running else 'loaded'}                {settle_time:9.1f} s"
        )
        print(f"PUT of a new unit, loaded, 201         {spread(creates)}")
        print(f"PUT of its desired state launched, 204 {spread(launches)}")
        print(f"DELETE of that unit, 204               {spread(deletes)}")
        print(f"every unit, FleetClient.list_units     {fmt(unit_lists)}")
        print(f"  the client's CPU for it              {min(unit_list_cpu) * 1000:9.1f} ms (min)")
        print(f"  of which decoding the pages          {unit_cpu * 1000:9.1f} ms (min)")
        print(f"every state, FleetClient.list_states   {fmt(state_lists)}")
        print(f"  the client's CPU for it              {min(state_list_cpu) * 1000:9.1f} ms (min)")
        print(f"  of which decoding the pages          {state_cpu * 1000:9.1f} ms (min)")
    finally:
        if running:
            kill_with_units(process, work / "localfleet")
        else:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)


async def start_localfleet(state_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A localfleet on `state_dir`, answering; its URL and process."""
    port = free_port()
    command = [sys.executable, "-m", "deployster", "localfleet", "--listen", f"127.0.0.1:{port}"]
    command += ["--machines", str(MACHINES), "--state-dir", str(state_dir)]
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "localfleet.log", "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    try:
        await wait_listening(f"http://127.0.0.1:{port}", process)
    except BaseException:
        stop(process)
        raise
    return f"http://127.0.0.1:{port}", process


def kill_with_units(process: subprocess.Popen[bytes], state_dir: Path) -> None:
    """SIGKILL localfleet, then the process groups of the units it noted as running."""
    process.kill()
    process.wait()
    store = RegistryStore(state_dir)
    for run in store.runs().values():
        for group in run.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    store.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def submit_one_by_one(count: int, state_dir: Path) -> None:
    """Every unit of `write_registry`, PUT one after the other to an empty localfleet."""
    url, process = await start_localfleet(state_dir)
    try:
        async with aiohttp.ClientSession() as session:
            start = time.perf_counter()
            for n in range(count):
                rel = release(n // INSTANCES)
                name = f"{rel}@{n % INSTANCES + 1}.service"
                body = {
                    "name": name,
                    "desiredState": "loaded",
                    "options": [o.to_wire() for o in options(rel)],
                }
                async with session.put(f"{url}/fleet/v1/units/{name}", json=body) as resp:
                    assert resp.status == 201, await resp.text()
            took = time.perf_counter() - start
        print(f"\n{count} units submitted one by one, PUT each: {took:.1f} s")
    finally:
        stop(process)


async def main(sizes: list[int], puts: int, runs: int, running: bool, submit: bool) -> None:
    for count in sizes:
        await one_size(count, puts, runs, running, submit)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--puts", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--running", action="store_true")
    parser.add_argument("--submit", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    asyncio.run(main(sizes, args.puts, args.runs, args.running, args.submit))
