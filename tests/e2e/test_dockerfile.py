"""The Dockerfile, built with podman and run: the containerized server answers.

No image registry is reachable here, so the base image is made from Debian's archive
(``debootstrap --variant=minbase`` with python3 and python3-venv, imported with ``podman
import``) and given to the build as ``BASE``; the build installs Deployster from a wheelhouse
made on this machine (mounted into the build with a pip.conf, so the Dockerfile has no test
knobs). Images and containers carry this run's id and are removed at the end: podman's storage
is shared with other test runs on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import known_secret, self_signed, wait_http

from deployster import __version__
from deployster.launchers import EtcdServer, free_port

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
RUN_ID = secrets.token_hex(4)
PASSWORD = known_secret("e2e-" + secrets.token_hex(8))
# What the multi-stage build may add to its base: the virtualenv with Deployster and its
# dependencies (no compilers, caches, pip or sources).
MAX_ADDED_BYTES = 90 * 1024 * 1024
# The fleet group's id on Container Linux, owner of fleet's socket (mode 0660).
FLEET_GID = 253


def require(*tools: str) -> None:
    """A missing prerequisite fails the run: scripts/e2e-prereqs installs them."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found; run scripts/e2e-prereqs", pytrace=False)


def sh(
    *argv: str | Path, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}",
            pytrace=False,
        )
    return done


def podman_remove(kind: str, name: str) -> None:
    sh("podman", kind, "--force", *(["--time", "0"] if kind == "rm" else []), name, check=False)


def image_size(name: str) -> int:
    return int(sh("podman", "image", "inspect", "--format", "{{.Size}}", name).stdout)


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian bookworm (minbase) with python3 and its venv module, as a local image."""
    require("debootstrap", "podman", "tar")
    if os.geteuid() != 0:
        pytest.fail("debootstrap needs root to build the base image", pytrace=False)
    root = tmp_path_factory.mktemp("base") / "rootfs"
    started = time.monotonic()
    sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", root)
    # What the image does not need: downloaded packages, package lists, docs, translations.
    for junk in (
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
    ):
        shutil.rmtree(root / junk)
    name = f"localhost/deployster-e2e-base-{RUN_ID}:bookworm"
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", name],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    print(f"\nbase image: {time.monotonic() - started:.1f} s, {image_size(name) / 1e6:.0f} MB")
    try:
        yield name
    finally:
        podman_remove("rmi", name)


@pytest.fixture(scope="module")
def image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The top-level Dockerfile built from ``base_image``, offline (``--network none``)."""
    work = tmp_path_factory.mktemp("build")
    wheels = work / "wheels"
    started = time.monotonic()
    # Wheels of Deployster, its dependencies and its build backend, made with this machine's
    # pip configuration (from a copy: setuptools leaves build/ beside the sources); inside the
    # build pip reads only them.
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):  # what the Dockerfile copies
        shutil.copy(REPO / name, src / name)
    for name in ("deployster", "handlers"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--wheel-dir",
        wheels,
        src,
        "setuptools>=68",
    )
    (work / "pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    name = f"localhost/deployster-e2e-{RUN_ID}:test"
    try:
        sh(
            "podman",
            "build",
            "--format",
            "docker",
            "--layers=false",
            "--network",
            "none",
            "--build-arg",
            f"BASE={base_image}",
            "--volume",
            f"{wheels}:/wheels:ro",
            "--volume",
            f"{work / 'pip.conf'}:/etc/pip.conf:ro",
            "--tag",
            name,
            "--file",
            REPO / "Dockerfile",
            REPO,
        )
        print(
            f"\nwheels and build: {time.monotonic() - started:.1f} s, image {image_size(name) / 1e6:.0f} MB"
        )
        yield name
    finally:
        podman_remove("rmi", name)


@pytest.fixture
def fleet_socket(tmp_path: Path) -> Iterator[Path]:
    """localfleet on a unix socket as Container Linux's fleet.socket makes it: mode 0660,
    group fleet (GID 253), so the container reaches it only through ``--group-add``."""
    sock = tmp_path / "fleet.sock"
    log = tmp_path / "localfleet.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "deployster", "localfleet", "--listen", f"unix:{sock}"],
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.chown(sock, -1, FLEET_GID)
        sock.chmod(0o660)
        yield sock
    finally:
        child.terminate()
        child.wait(30)


@pytest.fixture
def container() -> Iterator[str]:
    """A container name of this run; the container is removed at the end."""
    name = f"deployster-e2e-{RUN_ID}-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        podman_remove("rm", name)


def get(url: str, auth: bool = True) -> tuple[int, str]:
    headers = (
        {"Authorization": "Basic " + b64encode(f"deployster:{PASSWORD}".encode()).decode()}
        if auth
        else {}
    )
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=5
        ) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_the_image_is_small_non_root_with_a_healthcheck(image: str, base_image: str) -> None:
    inspected = json.loads(sh("podman", "image", "inspect", image).stdout)[0]
    assert inspected["Config"]["Entrypoint"] == ["deployster", "serve"]
    assert inspected["Config"]["User"] == "10001:10001"
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])  # kept by --format docker
    added = image_size(image) - image_size(base_image)
    assert 0 < added < MAX_ADDED_BYTES, f"the build added {added / 1e6:.0f} MB to its base"
    # Only the virtualenv came from the build stage: no sources, no pip, no build leftovers.
    listing = sh(
        "podman",
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "ls /opt/deployster/bin; test ! -e /src && test ! -e /wheels && echo clean",
    ).stdout
    assert "deployster" in listing.split() and "deployctl" in listing.split()
    assert "pip" not in listing.split() and listing.strip().endswith("clean")


def run_container(
    image: str, name: str, log: Path, env: dict[str, str], *options: str, args: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """``podman run`` in the foreground on the host network (the session's etcd is on
    loopback), its output in ``log``; ``args`` go to ``deployster serve``."""
    flags = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["podman", "run", "--name", name, "--network", "host", *flags, *options, image, *args],
            stdout=out,
            stderr=out,
        )


def wait_https(
    url: str, context: ssl.SSLContext | None, child: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert child.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)


def test_the_container_serves_the_api(
    image: str, container: str, etcd_server: EtcdServer, fleet_socket: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = fleet_socket.parent / "container.log"
    child = run_container(
        image,
        container,
        log,
        {
            "DEPLOYSTER_ETCD": etcd_server.endpoint,
            "DEPLOYSTER_LISTEN": f"127.0.0.1:{port}",
            "DEPLOYSTER_ETCD_PREFIX": f"/deployster-e2e-{RUN_ID}",
            "DEPLOYSTER_PASSWORD": PASSWORD,
        },
        "--volume",
        f"{fleet_socket}:/var/run/fleet.sock",
        "--group-add",
        str(FLEET_GID),
    )
    try:
        wait_http(f"{url}/healthz", child, log, timeout=60)
        assert get(f"{url}/v1/version") == (200, f"{__version__}\n")
        assert get(f"{url}/v1/version", auth=False)[0] == 401
        # fleet through the mounted socket, etcd over the host network.
        status, body = get(f"{url}/readyz", auth=False)
        assert (status, json.loads(body)) == (200, {"status": "ready", "etcd": "ok", "fleet": "ok"})
        assert sh("podman", "exec", container, "id", "-u").stdout.strip() == "10001"
        assert sh("podman", "healthcheck", "run", container, check=False).returncode == 0
        # SIGTERM (podman stop) ends the server cleanly, well before podman's SIGKILL.
        started = time.monotonic()
        sh("podman", "stop", "--time", "20", container)
        assert time.monotonic() - started < 15
        assert child.wait(30) == 0
        err = log.read_text()
        events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
        assert "server_started" in events and events[-1] == "server_stopped"
        assert PASSWORD not in err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_the_health_check_follows_https(
    image: str, container: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    # The certificate as README's TLS section says: in /etc/deployster/tls, readable by uid 10001.
    tls = tmp_path / "tls"
    tls.mkdir()
    self_signed(tls)
    for pem in tls.iterdir():
        os.chown(pem, 10001, 10001)
        pem.chmod(0o400)
    port = free_port()
    log = tmp_path / "container.log"
    child = run_container(
        image,
        container,
        log,
        {
            "DEPLOYSTER_ETCD": etcd_server.endpoint,
            "DEPLOYSTER_LISTEN": f"127.0.0.1:{port}",
            "DEPLOYSTER_PASSWORD": PASSWORD,
            "DEPLOYSTER_CERT": "/etc/deployster/tls/cert.pem",
            "DEPLOYSTER_KEY": "/etc/deployster/tls/key.pem",
        },
        "--volume",
        f"{tls}:/etc/deployster/tls:ro",
    )
    try:
        wait_https(
            f"https://127.0.0.1:{port}/healthz",
            ssl.create_default_context(cafile=str(tls / "cert.pem")),
            child,
            log,
        )
        assert sh("podman", "healthcheck", "run", container, check=False).returncode == 0
    finally:
        podman_remove("rm", container)
        child.wait(30)


def test_the_health_check_fails_when_nothing_answers_where_it_looks(
    image: str, container: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """It probes the port of DEPLOYSTER_LISTEN: a -listen flag elsewhere leaves it unhealthy."""
    port = free_port()
    log = tmp_path / "container.log"
    child = run_container(
        image,
        container,
        log,
        {
            "DEPLOYSTER_ETCD": etcd_server.endpoint,
            "DEPLOYSTER_PASSWORD": PASSWORD,
            "DEPLOYSTER_LISTEN": f"127.0.0.1:{free_port()}",
        },
        args=("-listen", f"127.0.0.1:{port}"),
    )
    try:
        wait_https(f"http://127.0.0.1:{port}/healthz", None, child, log)
        checked = sh("podman", "healthcheck", "run", container, check=False)
        assert checked.returncode != 0 and "unhealthy" in checked.stdout + checked.stderr
    finally:
        podman_remove("rm", container)
        child.wait(30)


def test_the_container_refuses_to_start_without_etcd(image: str, container: str) -> None:
    done = sh(
        "podman",
        "run",
        "--name",
        container,
        "--network",
        "host",
        "--env",
        f"DEPLOYSTER_ETCD=http://127.0.0.1:{free_port()}",
        "--env",
        f"DEPLOYSTER_PASSWORD={PASSWORD}",
        "--env",
        f"DEPLOYSTER_LISTEN=127.0.0.1:{free_port()}",
        image,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "did not answer within 10 s" in done.stderr
