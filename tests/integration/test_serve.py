"""`deployster serve` as a process: start-up checks, generated password, HTTPS, logs, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import LoggedProcess, self_signed

from deployster.launchers import EtcdServer, free_port


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts `deployster serve` processes (what a test reads of their logs is kept in a log
    file for the session's secret check); any still running at the end is killed."""
    children: list[subprocess.Popen[str]] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYSTER_")}
        child = LoggedProcess(
            [sys.executable, "-m", "deployster", "serve", *flags],
            tmp_path / f"serve-{len(children) + 1}.log",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**clean, **(env or {})},
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.communicate()


def get(url: str, password: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    token = b64encode(f"deployster:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_answer(
    url: str, password: str, child: subprocess.Popen[str], context: ssl.SSLContext | None = None
) -> tuple[int, str]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()
        try:
            return get(url, password, context)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def stop(child: subprocess.Popen[str]) -> tuple[str, str]:
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    return out, err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["-cert", "/nonexistent/cert.pem"], "HTTPS needs both -cert and -key"),
        (["-cert", "/nonexistent/c.pem", "-key", "/nonexistent/k.pem"], "does not exist"),
        (["--template", "/nonexistent/unit.service"], "/nonexistent/unit.service"),
        (["--fleet-endpoint", "ftp://fleet"], "fleet endpoint 'ftp://fleet' is not valid"),
        (["--etcd", "not a url://"], "-etcd"),
        (["--docker-endpoint", "ftp://docker"], "Docker endpoint 'ftp://docker' is not valid"),
        (["-task-max-timeout", "0"], "-task-max-timeout: Input should be greater than 0"),
    ],
)
def test_bad_configuration_stops_the_start_with_a_sentence(
    serve, flags: list[str], message: str
) -> None:  # type: ignore[no-untyped-def]
    child = serve("-password", "x", *flags)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 2
    assert message in err
    assert "Traceback" not in err


def test_bad_key_pair_never_falls_back_to_http(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "c.pem").write_text("garbage")
    (tmp_path / "k.pem").write_text("garbage")
    child = serve(
        "-password", "x", "-cert", str(tmp_path / "c.pem"), "-key", str(tmp_path / "k.pem")
    )
    _, err = child.communicate(timeout=30)
    assert child.returncode == 2 and "cannot be loaded" in err


def test_generated_password_json_logs_and_graceful_stop(
    serve, etcd_server: EtcdServer, localfleet: str
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    child = serve(
        "--listen",
        f"127.0.0.1:{port}",
        "--etcd",
        etcd_server.endpoint,
        "--fleet-endpoint",
        localfleet,
        "--template",
        "workload",
    )
    assert child.stdout is not None
    banner = child.stdout.readline()
    assert "generated one for user 'deployster'" in banner
    password = banner.rsplit(": ", 1)[1].strip()
    assert len(password) >= 20
    status, body = wait_answer(f"http://127.0.0.1:{port}/v1/version", password, child)
    assert status == 200 and body.strip()
    assert get(f"http://127.0.0.1:{port}/v1/version", "wrong")[0] == 401
    out, err = stop(child)
    lines = [json.loads(line) for line in err.splitlines()]  # JSON lines, every one of them
    events = [line["event"] for line in lines]
    assert "server_started" in events and events[-1] == "server_stopped"
    assert any(line["event"] == "http_request" and line["status"] == 401 for line in lines)
    assert password not in err and password not in out


def test_https_with_a_certificate(
    serve, tmp_path: Path, etcd_server: EtcdServer, localfleet: str
) -> None:  # type: ignore[no-untyped-def]
    self_signed(tmp_path)
    port = free_port()
    child = serve(
        "-listen",
        f"127.0.0.1:{port}",
        "-cert",
        str(tmp_path / "cert.pem"),
        "-key",
        str(tmp_path / "key.pem"),
        "--etcd",
        etcd_server.endpoint,
        "--fleet-endpoint",
        localfleet,
        "--template",
        "workload",
        env={"DEPLOYSTER_PASSWORD": "tls-secret"},
    )
    context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    status, _ = wait_answer(f"https://127.0.0.1:{port}/v1/version", "tls-secret", child, context)
    assert status == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/version", timeout=5)
    stop(child)
