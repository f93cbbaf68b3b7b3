"""Real containers: a 3-instance version cycle of a container image under load, through Traefik.

Runs ``deployster up`` (its default ``docker`` template, or ``--template workload`` for the
figure to compare with) in a scratch state dir, builds two versions of a tiny image locally
(busybox-static's httpd in a rootfs, imported with the docker CLI; never pushed: the default
pull policy ``missing`` runs it as built), deploys 3 instances of v1, then keeps CLIENTS
clients requesting the service through Traefik while it cycles to v2, and finally cycles to v3
without load. Prints requests, failures and latency percentiles per phase, and each cycle's
timeline from the deploy's own events.

    python bench/containers.py [--template docker] [--docker-cli docker] [--clients 16]

Needs a docker CLI (Docker, or podman with Debian's podman-docker) and /bin/busybox from
busybox-static.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from deployster.launchers import free_port
from deployster.testing.load import Load

SERVICE = "benchc"
PASSWORD = "bench"
BUSYBOX = Path("/bin/busybox")
SERVE = ["/bin/sh", "-c", "trap 'exit 0' TERM; httpd -f -p 3000 -h /www & wait"]


def build_images(docker: str, work: Path, versions: list[str]) -> None:
    """``deployster/<SERVICE>:<version>`` for each version: busybox applets, /www naming it."""
    for version in versions:
        root = work / f"rootfs-{version}"
        (root / "bin").mkdir(parents=True)
        (root / "www").mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        applets = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "www" / "index.html").write_text(f"{version}\n")
        (root / "www" / "health").write_text("ok\n")
        tar = work / f"{version}.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        subprocess.run(
            [
                *(docker, "import", "--change", f"CMD {json.dumps(SERVE)}"),
                *("--change", "ENV PATH=/bin", str(tar), f"deployster/{SERVICE}:{version}"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def start_up(
    work: Path, template: str, docker: str | None
) -> tuple[subprocess.Popen[str], str, str]:
    api, http = free_port(), free_port()
    argv = [
        str(Path(sys.executable).parent / "deployster"),
        "up",
        *("--state-dir", str(work / "state"), "--template", template),
        *("--listen", f"127.0.0.1:{api}", "--http-listen", f"127.0.0.1:{http}"),
        *("--etcd-listen", "127.0.0.1:0", "--traefik-api-listen", "127.0.0.1:0"),
    ]
    if docker:
        argv += ["--docker-cli", docker]
    up = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DEPLOYSTER_PASSWORD": PASSWORD},
    )
    assert up.stdout is not None
    banner = ""
    while not banner.endswith("Press Ctrl-C to stop.\n"):
        line = up.stdout.readline()
        if not line:
            raise SystemExit(f"deployster up did not come up:\n{banner}")
        banner += line
    return up, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{http}/"


async def deploy(
    session: aiohttp.ClientSession, api: str, version: str
) -> tuple[str, float, dict[str, Any]]:
    start = time.perf_counter()
    body = {"deploy": {"version": version, "destroy_previous": True, "instance_count": 3}}
    async with session.post(f"{api}/v1/services/{SERVICE}/deploys", json=body) as resp:
        deploy_id = (await resp.json())["deploy"]["id"]
    while True:
        async with session.get(f"{api}/v1/services/{SERVICE}/deploys/{deploy_id}") as resp:
            record = (await resp.json())["deploy"]
        if record["state"] not in ("pending", "running", "queued"):
            return record["state"], time.perf_counter() - start, record
        await asyncio.sleep(0.05)


def timeline(record: dict[str, Any]) -> str:
    """Each progress event, seconds after the deploy was created; then the split of the time
    into the instances' own start (submitted -> last instance healthy) and the rest."""
    start = datetime.fromisoformat(record["created_at"]).timestamp()
    at = {
        e["kind"] + str(e.get("unit") or ""): datetime.fromisoformat(e["at"]).timestamp() - start
        for e in record["events"]
    }
    lines = [
        f"  +{datetime.fromisoformat(e['at']).timestamp() - start:5.2f} s  {e['kind']}: {e['message']}"
        for e in record["events"]
    ]
    healthy = [t for k, t in at.items() if k.startswith(("instance_healthy", "instance_ready"))]
    if "submitted" in at and healthy:
        lines.append(
            f"  submitted -> every instance healthy (the containers starting): "
            f"{max(healthy) - at['submitted']:.2f} s"
        )
    return "\n".join(lines)


async def measure(args: argparse.Namespace, api: str, traffic: str) -> None:
    auth = {"Authorization": aiohttp.encode_basic_auth("deployster", PASSWORD)}
    async with aiohttp.ClientSession(headers=auth) as session:
        policy = {
            "health": {"interval": 0.1, "timeout": 1.0, "healthy_threshold": 1},
            "min_healthy_time": 0,
            "drain": args.drain,
            "instance_deadline": 60,
            "deploy_deadline": 120,
        }
        async with session.put(
            f"{api}/v1/services/{SERVICE}/policy", json={"policy": policy}
        ) as resp:
            assert resp.status == 200, await resp.text()
        state, first, _ = await deploy(session, api, "v1")
        print(f"[{args.template}] initial 3-instance deploy: {state} in {first:.2f} s")

        load = Load(traffic, f"{SERVICE}.localhost")
        async with load.running(args.clients):
            await asyncio.sleep(1)
            load.phase = "steady"
            await asyncio.sleep(args.steady)
            load.phase = "version cycle v1->v2"
            state2, cycle, cycled = await deploy(session, api, "v2")
            load.phase = "steady after"
            await asyncio.sleep(1)
        state3, quiet, quieted = await deploy(session, api, "v3")

        print(f"version cycle v1->v2 under load: {state2} in {cycle:.2f} s")
        print(timeline(cycled))
        print(f"version cycle v2->v3 without load: {state3} in {quiet:.2f} s")
        print(timeline(quieted))
        print(load.report(["steady", "version cycle v1->v2", "steady after"]))
        async with session.delete(f"{api}/v1/services/{SERVICE}/deploys/v3") as resp:
            await resp.read()


def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="deployster-bench-containers-"))
    docker = args.docker_cli or shutil.which("docker")
    images = [f"deployster/{SERVICE}:{v}" for v in ("v1", "v2", "v3")]
    try:
        if args.template == "docker":
            if docker is None:
                raise SystemExit("no docker CLI: pass --docker-cli, or --template workload")
            build_images(docker, work, ["v1", "v2", "v3"])
        up, api, traffic = start_up(
            work, args.template, docker if args.template == "docker" else None
        )
        try:
            asyncio.run(measure(args, api, traffic))
        finally:
            up.send_signal(signal.SIGINT)
            up.communicate(timeout=120)
    finally:
        if args.template == "docker" and docker:
            subprocess.run([docker, "rmi", "--force", *images], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", choices=["docker", "workload"], default="docker")
    parser.add_argument("--docker-cli", default=None, help="default: docker on PATH")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steady", type=float, default=5.0)
    parser.add_argument("--drain", type=float, default=0.5, help="the policy's drain, seconds")
    main(parser.parse_args())
