"""The e2e tier's real parts: podman's Docker-compatible API service on a socket of this run,
a tiny busybox image built here, and a local registry (Debian's docker-registry) to pull from.

Everything follows `docs/containers.md`. The podman storage is shared by every test run
on the machine: every name made here carries the run's token, and only those are removed.
A missing program fails the run (``pytest.fail``), never skips it: scripts/e2e-prereqs
installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")  # from busybox-static: statically linked


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"the e2e tier needs {', '.join(missing)}: run scripts/e2e-prereqs (as root)")


def _stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def _check(*argv: str, env: dict[str, str] | None = None) -> str:
    done = _run(*argv, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done.stdout


# -- podman's API service ---------------------------------------------------------------------


@dataclass
class Podman:
    """``podman system service`` on a socket of this run (containers.md §6)."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]  # what the service runs with; CLI calls use it too

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run("podman", *args, env=self.env)

    def image_exists(self, image: str) -> bool:
        return self.cli("image", "exists", image).returncode == 0

    def containers(self, label: str) -> list[dict[str, object]]:
        """Containers (running or not) carrying ``label`` (``key=value``)."""
        out = _check(
            "podman", "ps", "-a", "--format", "json", "--filter", f"label={label}", env=self.env
        )
        return list(json.loads(out or "[]"))

    def stop(self) -> None:
        _stop(self.process)


def _ping(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.")
    except OSError:
        return False


def start_podman(workdir: Path, insecure_registries: list[str]) -> Podman:
    """Start the API service with a registries config of its own that trusts
    ``insecure_registries`` over plain HTTP. The service reads that config once at start
    (containers.md §6.4), so it is written first; the host's config is not touched."""
    require("podman")
    workdir.mkdir(parents=True, exist_ok=True)
    registries = workdir / "registries.conf"
    registries.write_text(
        "".join(
            f'[[registry]]\nlocation = "{host}"\ninsecure = true\n\n'
            for host in insecure_registries
        )
    )
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registries)}
    sock = workdir / "podman.sock"
    log = workdir / "podman-service.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            stdout=out,
            stderr=out,
            env=env,
        )
    deadline = time.monotonic() + 30
    while not _ping(sock):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"podman system service did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return Podman(sock, process, log, env)


def podman_docker_cli() -> str:
    """The ``docker`` of Debian's podman-docker (a script that runs podman), wherever PATH
    has it; another docker CLI may come first on PATH, so each one is read."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / "docker"
        try:
            head = candidate.read_bytes()[:512]
        except OSError:
            continue
        if head.startswith(b"#!") and b"podman" in head:
            return str(candidate)
    pytest.fail("the e2e tier needs podman's docker CLI (podman-docker): run scripts/e2e-prereqs")


# -- the test image ---------------------------------------------------------------------------


def build_image(
    podman: Podman, workdir: Path, name: str, entrypoint: list[str] | None = None
) -> str:
    """A ~2 MB image of busybox-static applets (containers.md §5), as ``name``."""
    require("podman")
    if not BUSYBOX.exists():
        pytest.fail(f"the e2e tier needs {BUSYBOX} (busybox-static): run scripts/e2e-prereqs")
    root = workdir / "imgfs"
    if not root.exists():
        for sub in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for applet in _check(str(BUSYBOX), "--list").split():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
    tar = workdir / "image.tar"
    if not tar.exists():
        _check("tar", "-C", str(root), "-cf", str(tar), ".")
    changes = ["--change", 'CMD ["/bin/sh"]', "--change", "ENV PATH=/bin"]
    if entrypoint:
        changes += ["--change", f"ENTRYPOINT {json.dumps(entrypoint)}"]
    _check("podman", "import", "--quiet", *changes, str(tar), name, env=podman.env)
    return name


def remove_images(podman: Podman, marker: str) -> None:
    """Remove every image whose name contains ``marker`` (this run's token)."""
    out = podman.cli("images", "--format", "json").stdout
    names = {
        n for image in json.loads(out or "[]") for n in image.get("Names") or () if marker in n
    }
    if names:
        podman.cli("rmi", "--force", *sorted(names))


def remove_containers(podman: Podman, marker: str) -> None:
    """Force-remove every container with a label value containing ``marker``."""
    out = podman.cli("ps", "-a", "--format", "json").stdout
    ids = [
        c["Id"]
        for c in json.loads(out or "[]")
        if any(marker in str(v) for v in (c.get("Labels") or {}).values())
    ]
    if ids:
        podman.cli("rm", "--force", "--time", "0", *ids)
