"""localfleet over HTTP: fleet's v1 contract (fleet-api.md) and the units it runs.

One localfleet subprocess with 3 machines serves the module, started as users
start it (`python -m deployster.localfleet`). Each test names its units with
its own random prefix and destroys them at the end. Every process localfleet
starts inherits a marker variable, so the tests can find the processes of a
unit in /proc and prove they are gone; the module ends by stopping localfleet
and checking that no marked process is left.

Unit option values follow systemd's rules, so a shell `$$` is written `$$$$`
and a literal `%` is written `%%`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
from helpers import process_running
from multidict import CIMultiDict

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc"), reason="needs /proc to find unit processes"
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MARKER_VARIABLE = "LOCALFLEET_TEST_RUN"
WAIT_SECONDS = 10.0
T = TypeVar("T")


# Processes


def live_processes(**environment: str) -> list[int]:
    """Pids of running (non-zombie) processes whose environment has all these assignments."""
    needles = {f"{key}={value}".encode() for key, value in environment.items()}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_bytes()
            env = set(pathlib.Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X") and needles <= env:
            pids.append(int(entry))
    return pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FleetProcess:
    """`deployster localfleet` running on a local port."""

    def __init__(
        self, workdir: pathlib.Path, machines: int, state_dir: pathlib.Path | None, port: int
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.marker = uuid.uuid4().hex
        self.log_path = workdir / f"localfleet-{port}-{self.marker[:6]}.log"
        command = [
            sys.executable,
            "-m",
            "deployster",
            "localfleet",
            "--listen",
            f"127.0.0.1:{port}",
        ]
        command += ["--machines", str(machines)]
        if state_dir is not None:
            command += ["--state-dir", str(state_dir)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, MARKER_VARIABLE: self.marker},
            )
        self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"localfleet exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/fleet/v1/machines", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # busy machine
                time.sleep(0.05)
        self.process.kill()
        raise AssertionError(f"localfleet did not answer within {WAIT_SECONDS}s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager stops it; it must stop its units and exit 0."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"localfleet did not stop within {timeout}s:\n{self.log()}"
            ) from None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    process = FleetProcess(
        tmp_path_factory.mktemp("localfleet"), machines=3, state_dir=None, port=free_port()
    )
    try:
        yield process
    finally:
        returncode = process.stop()
        assert returncode == 0, process.log()
        assert live_processes(**{MARKER_VARIABLE: process.marker}) == [], (
            "unit processes outlived localfleet"
        )
        for event in (
            "unit_instance_error",
            "unit_run_error",
            "api_error",
        ):  # localfleet's unexpected exceptions
            assert event not in process.log(), process.log()


# Client


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT_SECONDS
) -> T:
    """Poll `probe` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class FleetClient:
    """A thin fleet v1 client; it remembers the units it created so the test can clean up."""

    def __init__(self, session: aiohttp.ClientSession, fleet: FleetProcess, prefix: str) -> None:
        self.session = session
        self.fleet = fleet
        self.prefix = prefix
        self.created: set[str] = set()

    def name(self, stem: str, suffix: str = ".service") -> str:
        return f"{self.prefix}-{stem}{suffix}"

    async def request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.request(method, f"/fleet/v1{path}", **kwargs) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None, response

    async def put(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        status, payload, _ = await self.request("PUT", f"/units/{name}", json=body)
        if status == 201:
            self.created.add(name)
        return status, payload

    async def submit(
        self, name: str, service: dict[str, str] | list[tuple[str, str]], **sections: Any
    ) -> None:
        options = options_of(service, **sections)
        status, payload = await self.put(name, {"name": name, "options": options})
        assert status == 201, payload

    async def set_state(self, name: str, desired_state: str) -> None:
        status, payload = await self.put(name, {"desiredState": desired_state})
        assert status == 204, payload

    async def launch(
        self, name: str, service: dict[str, str] | list[tuple[str, str]], **sections: Any
    ) -> None:
        await self.submit(name, service, **sections)
        await self.set_state(name, "launched")

    async def destroy(self, name: str) -> None:
        status, payload, _ = await self.request("DELETE", f"/units/{name}")
        assert status in (204, 404), payload

    async def unit(self, name: str) -> dict[str, Any] | None:
        status, payload, _ = await self.request("GET", f"/units/{name}")
        return payload if status == 200 else None

    async def paged(
        self, path: str, key: str, params: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        query = dict(params or {})
        while True:
            status, payload, _ = await self.request("GET", path, params=query)
            assert status == 200, payload
            items += payload.get(key, [])
            if "nextPageToken" not in payload:
                return items
            query["nextPageToken"] = payload["nextPageToken"]

    async def states(self, unit_name: str) -> list[dict[str, Any]]:
        return await self.paged("/state", "states", {"unitName": unit_name})

    async def wait_state(self, name: str, active: str, sub: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            states = await self.states(name)
            if states and (states[0]["systemdActiveState"], states[0]["systemdSubState"]) == (
                active,
                sub,
            ):
                return states[0]
            return None

        try:
            return await wait_for(probe, f"{name} {active}/{sub}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; now {await self.states(name)}\n{self.fleet.log()[-3000:]}"
            ) from None

    async def wait_gone(self, name: str) -> None:
        async def probe() -> bool:
            return await self.states(name) == []

        await wait_for(probe, f"{name} to leave /state")

    async def cleanup(self) -> None:
        for name in self.created:
            await self.destroy(name)
        for name in self.created:
            await self.wait_gone(name)


def options_of(
    service: dict[str, str] | list[tuple[str, str]], **sections: Any
) -> list[dict[str, str]]:
    """Options from `[Service]` lines plus other sections given as keyword arguments, e.g. X_Fleet=[...]."""
    lines = list(service.items()) if isinstance(service, dict) else list(service)
    options = [{"section": "Service", "name": name, "value": value} for name, value in lines]
    for section, section_lines in sections.items():
        options += [
            {"section": section.replace("_", "-"), "name": name, "value": value}
            for name, value in section_lines
        ]
    return options


@pytest.fixture
async def client(fleet: FleetProcess) -> AsyncIterator[FleetClient]:
    async with aiohttp.ClientSession(base_url=fleet.url) as session:
        fleet_client = FleetClient(session, fleet, f"t{uuid.uuid4().hex[:8]}")
        try:
            yield fleet_client
        finally:
            await fleet_client.cleanup()


def unit_processes(fleet: FleetProcess, unit_name: str) -> list[int]:
    return live_processes(**{MARKER_VARIABLE: fleet.marker, "TEST_UNIT": unit_name})


SLEEPER = {"Environment": "TEST_UNIT=%n", "ExecStart": "/bin/sleep 300"}


# Paths, methods, headers


async def test_discovery_server_header_and_alias(client: FleetClient) -> None:
    status, payload, response = await client.request("GET", "/discovery")
    assert status == 200
    assert (payload["id"], payload["basePath"]) == ("fleet:v1", "/fleet/v1/")
    assert response.headers["Server"] == "fleetd/localfleet-1.0.0"
    assert response.headers["Content-Type"] == "application/json"
    status, payload, _ = await client.request("POST", "/discovery")
    assert (status, payload["error"]["code"]) == (400, 400)
    async with client.session.get("/v1-alpha/machines") as response:
        assert response.status == 200 and len((await response.json())["machines"]) == 3


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 405),
        ("GET", "/fleet/v1", 405),
        ("GET", "/fleet/v1/", 404),
        ("GET", "/fleet/v1/units/", 404),
        ("GET", "/fleet/v1/state/", 404),
        ("GET", "/fleet/v1/machines/", 404),
        ("GET", "/fleet/v1/units/a.service/extra", 404),
        ("GET", "/fleet/v1/nothing", 404),
        ("GET", "/metrics-nope", 404),
        ("POST", "/fleet/v1/units", 405),
        ("PUT", "/fleet/v1/units", 405),
        ("POST", "/fleet/v1/units/a.service", 405),
        ("PATCH", "/fleet/v1/units/a.service", 405),
        ("DELETE", "/fleet/v1/state", 405),
        ("PUT", "/fleet/v1/state/a.service", 405),
        ("DELETE", "/fleet/v1/machines", 405),
        ("POST", "/v1-alpha/units", 405),
    ],
)
async def test_paths_and_methods_answer_like_gos_mux(
    client: FleetClient, method: str, path: str, status: int
) -> None:
    async with client.session.request(method, path) as response:
        assert response.status == status
        assert response.headers["Server"] == "fleetd/localfleet-1.0.0"
        payload = await response.json()
    assert payload["error"]["code"] == status
    assert isinstance(payload["error"]["message"], str)


async def test_unknown_units_and_states_are_404(client: FleetClient) -> None:
    name = client.name("missing")
    for method, path, message in [
        ("GET", f"/units/{name}", "unit does not exist"),
        ("DELETE", f"/units/{name}", "unit does not exist"),
        ("GET", f"/state/{name}", "unit state does not exist"),
    ]:
        status, payload, _ = await client.request(method, path)
        assert (status, payload) == (404, {"error": {"code": 404, "message": message}})
    status, payload, _ = await client.request("GET", "/state", params={"unitName": name})
    assert (status, payload) == (200, {})  # omitempty: no "states" key at all


# PUT semantics, fleet-api.md §4 in order


async def test_put_content_type_rules(client: FleetClient) -> None:
    name = client.name("ctype")
    body = json.dumps({"options": options_of({"ExecStart": "/bin/true"})}).encode()
    cases = [
        ({}, ["Content-Type"]),
        ({"Content-Type": "text/plain"}, []),
        ({"Content-Type": "application/jsonx"}, []),
    ]
    for headers, skip in cases:
        async with client.session.put(
            f"/fleet/v1/units/{name}", data=body, headers=headers, skip_auto_headers=skip
        ) as response:
            payload = await response.json()
            assert (response.status, payload["error"]["code"]) == (415, 415), headers
    # fleet answers 415 to two Content-Type headers; aiohttp's parser refuses them earlier, with 400.
    twice = CIMultiDict(
        [("Content-Type", "application/json"), ("Content-Type", "application/json")]
    )
    async with client.session.put(f"/fleet/v1/units/{name}", data=body, headers=twice) as response:
        assert response.status in (400, 415)
    async with client.session.put(
        f"/fleet/v1/units/{name}",
        data=body,
        headers={"Content-Type": "application/json; charset=utf-8"},
    ) as response:
        assert response.status == 201
    client.created.add(name)


async def test_put_status_table(client: FleetClient) -> None:
    name = client.name("table")
    options = options_of({"ExecStart": "/bin/sleep 300"})

    async def put_raw(body: bytes) -> tuple[int, Any]:
        status, payload, _ = await client.request(
            "PUT", f"/units/{name}", data=body, headers={"Content-Type": "application/json"}
        )
        return status, payload

    # 2: the body must decode
    status, payload = await put_raw(b'{"name": ')
    assert status == 400 and payload["error"]["message"].startswith("unable to decode body")
    # 3b: body name differs from the URL
    status, payload = await client.put(name, {"name": client.name("other"), "options": options})
    assert status == 400 and "differs from unit name in request body" in payload["error"]["message"]
    # 3c: name validation (§6)
    for bad_name, message in [
        ("hello.exe", 'invalid unit type: "exe"'),
        ("x@1.mount", "invalid unit type for template"),
    ]:
        status, payload = await client.put(bad_name, {"options": options})
        assert status == 400 and message in payload["error"]["message"]
    # 4: unknown unit without options
    status, payload = await client.put(name, {"desiredState": "launched"})
    assert (status, payload) == (
        409,
        {"error": {"code": 409, "message": "unit does not exist and options field empty"}},
    )
    # 4b: invalid options
    bad = options_of({"ExecStart": "/bin/true"}, X_Fleet=[("MachineID", "abc"), ("Global", "true")])
    status, payload = await client.put(name, {"options": bad})
    assert (status, payload["error"]["message"]) == (400, "MachineID cannot be used with Global")
    status, payload = await client.put(
        name, {"options": options_of({"ExecStart": "/bin/" + "x" * 3000})}
    )
    assert status == 400 and "line too long" in payload["error"]["message"]
    # 4c: an invalid desiredState on create is a 500 with an empty message, and nothing is stored
    status, payload = await client.put(name, {"options": options, "desiredState": "running"})
    assert (status, payload) == (500, {"error": {"code": 500, "message": ""}})
    assert await client.unit(name) is None
    # 4c: created, name taken from the URL, desiredState defaults to inactive
    status, payload = await client.put(name, {"options": options})
    assert (status, payload) == (201, None)
    assert await client.unit(name) == {
        "name": name,
        "options": options,
        "desiredState": "inactive",
        "currentState": "inactive",
    }
    # 6: same options (or none) without desiredState
    assert (await client.put(name, {"options": options}))[0] == 409
    status, payload = await client.put(name, {"name": name})
    assert (status, payload["error"]["message"]) == (
        409,
        "must provide DesiredState to update existing unit",
    )
    # 6c: desired state set; on this path fleet does not validate it
    assert await client.put(name, {"desiredState": "bogus"}) == (204, None)
    assert (await client.unit(name))["desiredState"] == "bogus"
    assert await client.put(name, {"name": name, "options": options, "desiredState": "loaded"}) == (
        204,
        None,
    )
    unit = await client.unit(name)
    assert unit["desiredState"] == "loaded" and re.fullmatch("[0-9a-f]{32}", unit["machineID"])
    # 5: different options replace the unit; without desiredState it goes back to inactive, as in fleet
    replaced = options_of({"ExecStart": "/bin/sleep 301"})
    assert await client.put(name, {"options": replaced}) == (201, None)
    unit = await client.unit(name)
    assert (unit["options"], unit["desiredState"], unit["currentState"]) == (
        replaced,
        "inactive",
        "inactive",
    )
    assert "machineID" not in unit
    # DELETE, then it is gone
    status, _, _ = await client.request("DELETE", f"/units/{name}")
    assert status == 204
    assert await client.unit(name) is None


async def test_templates_cannot_be_activated(client: FleetClient) -> None:
    template = client.name("tmpl@", suffix=".service")
    await client.submit(template, {"ExecStart": "/bin/sleep 300"})
    status, payload = await client.put(template, {"desiredState": "launched"})
    assert (status, payload["error"]["message"]) == (400, f'cannot activate template "{template}"')
    assert await client.put(template, {"desiredState": "inactive"}) == (204, None)
    # No server-side template expansion: an instance needs its own options.
    status, _ = await client.put(client.name("tmpl@1"), {"desiredState": "launched"})
    assert status == 409


# Pagination, fleet-api.md §5


async def test_pagination_past_100_units(client: FleetClient) -> None:
    names = [client.name(f"page{index:03d}") for index in range(250)]
    for name in names:
        await client.submit(name, {"ExecStart": "/bin/true"})
    pages: list[list[str]] = []
    query: dict[str, str] = {}
    while True:
        status, payload, _ = await client.request("GET", "/units", params=query)
        assert status == 200
        pages.append([unit["name"] for unit in payload.get("units", [])])
        if "nextPageToken" not in payload:
            break
        query = {"nextPageToken": payload["nextPageToken"]}
    listed = [name for page in pages for name in page]
    assert all(len(page) == 100 for page in pages[:-1])
    assert len(listed) == len(set(listed)), "a unit was listed twice"
    assert [
        name for name in listed if name.startswith(client.prefix)
    ] == names  # sorted by name, each once
    assert listed == sorted(listed)

    async with client.session.get("/fleet/v1/units") as response:
        token = (await response.json())["nextPageToken"]
    assert token == "ZAACAA=="  # base64url, with padding, of {Limit:100, Page:2} little-endian
    wrong_limit = "MgACAA=="  # {50, 2}
    page_zero = "ZAAAAA=="  # {100, 0}
    bad_queries = [
        [("nextPageToken", "garbage!")],
        [("nextPageToken", wrong_limit)],
        [("nextPageToken", page_zero)],
        [("nextPageToken", token), ("nextPageToken", token)],
    ]
    for path in ("/units", "/state", "/machines"):
        for query_pairs in bad_queries:
            status, payload, _ = await client.request("GET", path, params=query_pairs)
            assert (status, payload["error"]["code"]) == (400, 400), (path, query_pairs)


# Running units


async def test_launched_unit_reaches_running(client: FleetClient, tmp_path: pathlib.Path) -> None:
    name = client.name("run")
    service = {
        "Environment": "TEST_UNIT=%n",
        "ExecStartPre": f"/bin/sh -c 'echo pre > {tmp_path}/pre'",
        "ExecStart": "/bin/sleep 300",
    }
    await client.launch(name, service)
    state = await client.wait_state(name, "active", "running")
    text = "[Service]\n" + "".join(f"{key}={value}\n" for key, value in service.items())
    assert state == {
        "name": name,
        "hash": hashlib.sha1(text.encode()).hexdigest(),
        "machineID": state["machineID"],
        "systemdLoadState": "loaded",
        "systemdActiveState": "active",
        "systemdSubState": "running",
    }
    assert (tmp_path / "pre").read_text() == "pre\n"
    unit = await client.unit(name)
    assert (unit["currentState"], unit["machineID"]) == ("launched", state["machineID"])
    status, single, _ = await client.request("GET", f"/state/{name}")
    assert (status, single) == (200, state)
    filtered = await client.paged(
        "/state", "states", {"machineID": state["machineID"], "unitName": name}
    )
    assert filtered == [state]
    assert len(unit_processes(client.fleet, name)) == 1


async def test_failing_exec_start_fails_the_unit(client: FleetClient) -> None:
    name = client.name("false")
    await client.launch(name, {"ExecStart": "/bin/false"})
    await client.wait_state(name, "failed", "failed")
    # fleet's currentState says the agent called start, not that the service is up.
    assert (await client.unit(name))["currentState"] == "launched"


async def test_failing_exec_start_pre_fails_without_starting(
    client: FleetClient, tmp_path: pathlib.Path
) -> None:
    name = client.name("prefail")
    await client.launch(
        name,
        [
            ("ExecStartPre", "/bin/sh -c 'exit 3'"),
            ("ExecStart", f"/bin/sh -c 'touch {tmp_path}/started; exec sleep 300'"),
            ("ExecStop", f"/bin/touch {tmp_path}/stop"),
            ("ExecStopPost", f"/bin/touch {tmp_path}/stop-post"),
        ],
    )
    await client.wait_state(name, "failed", "failed")
    assert not (tmp_path / "started").exists()
    assert not (tmp_path / "stop").exists()  # ExecStop only runs after a successful start
    assert (tmp_path / "stop-post").exists()  # ExecStopPost always runs


async def test_ignored_failing_exec_start_pre_still_runs(client: FleetClient) -> None:
    name = client.name("ignored")
    await client.launch(
        name,
        [("ExecStartPre", "-/bin/false"), ("ExecStartPre", "-/no/such/binary"), *SLEEPER.items()],
    )
    await client.wait_state(name, "active", "running")


async def test_missing_environment_file_fails_unless_optional(client: FleetClient) -> None:
    required, optional = client.name("envreq"), client.name("envopt")
    await client.launch(required, {"EnvironmentFile": "/no/such/file.env", **SLEEPER})
    await client.launch(optional, {"EnvironmentFile": "-/no/such/file.env", **SLEEPER})
    await client.wait_state(required, "failed", "failed")
    await client.wait_state(optional, "active", "running")


async def test_stop_runs_exec_stop_and_kills_the_main_process(
    client: FleetClient, tmp_path: pathlib.Path
) -> None:
    name = client.name("stop")
    await client.launch(
        name,
        {
            "Environment": "TEST_UNIT=%n",
            "ExecStart": f"/bin/sh -c 'echo $$$$ > {tmp_path}/main.pid; exec sleep 300'",
            "ExecStop": f'/bin/sh -c "echo stopped $MAINPID > {tmp_path}/stopped"',
        },
    )
    await client.wait_state(name, "active", "running")
    main_pid = int(await wait_for(lambda: _read(tmp_path / "main.pid"), "main pid file"))
    assert process_running(main_pid)

    await client.set_state(name, "loaded")
    await client.wait_state(
        name, "inactive", "dead"
    )  # sleep dies of SIGTERM: a clean exit for systemd
    assert (tmp_path / "stopped").read_text() == f"stopped {main_pid}\n"
    assert not process_running(main_pid)
    unit = await client.unit(name)
    assert (unit["desiredState"], unit["currentState"]) == ("loaded", "loaded")

    await client.set_state(name, "launched")  # a stopped unit starts again
    await client.wait_state(name, "active", "running")

    async def new_main_pid() -> str | None:  # `running` comes at the spawn, before the echo
        text = await _read(tmp_path / "main.pid")
        return text if text is not None and int(text) != main_pid else None

    await wait_for(new_main_pid, "a new main process")


async def test_replacing_options_reloads_the_unit_in_place(
    client: FleetClient, tmp_path: pathlib.Path
) -> None:
    name = client.name("replace")
    first = {"ExecStart": "/bin/sleep 300", "ExecStop": f"/bin/touch {tmp_path}/first-stopped"}
    await client.launch(name, first)
    old = await client.wait_state(name, "active", "running")
    second = {"ExecStart": "/bin/sleep 301"}
    status, _ = await client.put(name, {"options": options_of(second), "desiredState": "launched"})
    assert status == 201

    async def new_hash_running() -> dict[str, Any] | None:
        state = (await client.states(name) or [None])[0]
        if state and state["hash"] != old["hash"] and state["systemdSubState"] == "running":
            return state
        return None

    new = await wait_for(new_hash_running, "the replaced unit to run")
    assert new["machineID"] == old["machineID"]
    assert (tmp_path / "first-stopped").exists()


async def test_destroy_removes_the_unit_and_kills_its_processes(client: FleetClient) -> None:
    name = client.name("destroy")
    await client.launch(
        name,
        {"Environment": "TEST_UNIT=%n", "ExecStart": "/bin/sh -c 'sleep 300 & exec sleep 301'"},
    )
    await client.wait_state(name, "active", "running")
    await wait_for(
        lambda: _async(len(unit_processes(client.fleet, name)) == 2), "main and background child"
    )

    await client.destroy(name)
    assert await client.unit(name) is None
    assert name not in [unit["name"] for unit in await client.paged("/units", "units")]
    await client.wait_gone(name)
    assert unit_processes(client.fleet, name) == []


async def test_environment_files_specifiers_and_variables_reach_the_process(
    client: FleetClient, tmp_path: pathlib.Path
) -> None:
    name = client.name("env@inst")
    env_file = tmp_path / "unit.env"
    env_file.write_text("# comment\nFROM_FILE='file value'\nOVERRIDDEN=\"from file\"\n")
    out = tmp_path / "out"
    script = (
        'printf "%%s\\n" "$GREETING" "$FROM_FILE" "$OVERRIDDEN" "$UNIT" "$NAME" "$PREFIX" "$INSTANCE"'
        f' "$MACHINE" "$HOST" "$0" "$1" "$2" "50%%" > {out}; exec sleep 300'
    )
    await client.launch(
        name,
        [
            ("Environment", '"GREETING=hello world" OVERRIDDEN=from-environment'),
            ("Environment", "UNIT=%n NAME=%N PREFIX=%p INSTANCE=%i MACHINE=%m HOST=%H"),
            ("Environment", '"SPLIT=one two"'),
            ("Environment", '"WHOLE=x y"'),
            ("EnvironmentFile", str(env_file)),
            ("EnvironmentFile", "-/no/such/optional.env"),
            ("ExecStart", f"/bin/sh -c '{script}' $SPLIT ${{WHOLE}}"),
        ],
    )
    state = await client.wait_state(name, "active", "running")
    lines = (await wait_for(lambda: _read(out), "the unit's output")).split("\n")
    assert lines[:-1] == [
        "hello world",
        "file value",
        "from file",
        name,
        name.removesuffix(".service"),
        client.name("env", suffix=""),
        "inst",
        state["machineID"],
        socket.gethostname(),
        "one",
        "two",
        "x y",
        "50%",
    ]


# Placement


async def test_conflicts_spread_instances_and_the_fourth_waits(client: FleetClient) -> None:
    names = [client.name(f"app@{index}") for index in range(1, 5)]
    for name in names:
        await client.launch(name, SLEEPER, X_Fleet=[("Conflicts", client.name("app@*"))])
    states = [await client.wait_state(name, "active", "running") for name in names[:3]]
    machines = [machine["id"] for machine in await client.paged("/machines", "machines")]
    assert sorted(state["machineID"] for state in states) == sorted(machines)
    waiting = await client.unit(names[3])
    assert (waiting["desiredState"], waiting["currentState"]) == ("launched", "inactive")
    assert "machineID" not in waiting
    assert await client.states(names[3]) == []

    await client.destroy(names[0])  # frees a machine: the waiting instance takes it
    state = await client.wait_state(names[3], "active", "running")
    assert state["machineID"] == states[0]["machineID"]


async def test_machine_of_colocates_and_waits_for_its_peer(client: FleetClient) -> None:
    app, sidekick = client.name("colo"), client.name("colo-sidekick")
    await client.launch(sidekick, SLEEPER, X_Fleet=[("MachineOf", app)])
    await asyncio.sleep(0.2)
    assert (await client.unit(sidekick))["currentState"] == "inactive"  # its peer is not placed yet
    await client.launch(app, SLEEPER)
    app_state = await client.wait_state(app, "active", "running")
    sidekick_state = await client.wait_state(sidekick, "active", "running")
    assert sidekick_state["machineID"] == app_state["machineID"]


async def test_global_unit_runs_once_per_machine(
    client: FleetClient, tmp_path: pathlib.Path
) -> None:
    name = client.name("global")
    await client.launch(
        name,
        {
            "Environment": "TEST_UNIT=%n",
            "ExecStart": f"/bin/sh -c 'echo %m > {tmp_path}/%m; exec sleep 300'",
        },
        X_Fleet=[("Global", "true")],
    )
    machines = sorted(machine["id"] for machine in await client.paged("/machines", "machines"))

    async def all_running() -> list[dict[str, Any]] | None:
        states = await client.states(name)
        running = [s for s in states if s["systemdSubState"] == "running"]
        return states if len(running) == len(machines) else None

    states = await wait_for(all_running, "one running state per machine")
    assert [state["machineID"] for state in states] == machines  # sorted by name, then machine id

    async def all_written() -> list[str] | None:  # `running` comes at the spawn, before the echo
        written = sorted(p.name for p in tmp_path.iterdir() if p.read_text().endswith("\n"))
        return written if written == machines else None

    await wait_for(all_written, "every machine's instance to write its file")
    assert all((tmp_path / machine).read_text() == f"{machine}\n" for machine in machines)
    assert len(unit_processes(client.fleet, name)) == len(machines)
    single = await client.unit(name)
    assert "machineID" not in single and "currentState" not in single
    listed = next(unit for unit in await client.paged("/units", "units") if unit["name"] == name)
    assert "machineID" not in listed and listed["desiredState"] == "launched"


async def test_machines_and_metadata_placement(client: FleetClient) -> None:
    machines = await client.paged("/machines", "machines")
    assert len(machines) == 3
    assert all(
        re.fullmatch("[0-9a-f]{32}", m["id"]) and m["primaryIP"] == "127.0.0.1" for m in machines
    )
    assert all("metadata" not in machine for machine in machines)
    target = machines[1]["id"]
    key = client.prefix

    async def patch(ops: Any) -> tuple[int, Any]:
        status, payload, _ = await client.request("PATCH", "/machines", json=ops)
        return status, payload

    assert (await patch([{"op": "add", "path": f"/{target}/metadata/{key}", "value": "plain"}]))[
        0
    ] == 400
    assert (
        await patch([{"op": "move", "path": f"/{target}/metadata/{key}", "value": {"value": "x"}}])
    )[0] == 400
    assert (
        await patch([{"op": "add", "path": f"/{target}/metadata/{key}", "value": {"value": "yes"}}])
    )[0] == 204
    try:
        listed = {m["id"]: m for m in await client.paged("/machines", "machines")}
        assert listed[target]["metadata"] == {key: "yes"}
        name = client.name("meta")
        await client.launch(name, SLEEPER, X_Fleet=[("MachineMetadata", f"{key}=yes")])
        assert (await client.wait_state(name, "active", "running"))["machineID"] == target
        pinned = client.name("pinned")
        await client.launch(pinned, SLEEPER, X_Fleet=[("MachineID", machines[2]["id"])])
        assert (await client.wait_state(pinned, "active", "running"))["machineID"] == machines[2][
            "id"
        ]
    finally:
        assert (await patch([{"op": "remove", "path": f"/{target}/metadata/{key}"}]))[0] == 204


# Restart with a state directory


async def test_restart_with_state_dir_relaunches_units(tmp_path: pathlib.Path) -> None:
    state_dir, starts, stops = tmp_path / "state", tmp_path / "starts", tmp_path / "stops"
    port = free_port()
    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            client = FleetClient(session, fleet, "restart")
            status, payload, _ = await client.request("GET", "/units")
            assert (status, payload) == (200, {})  # an empty cluster: omitempty down to {}
            name = client.name("kept")
            await client.launch(
                name,
                {
                    "ExecStart": f"/bin/sh -c 'echo started >> {starts}; echo output-line; exec sleep 300'",
                    "ExecStop": f"/bin/sh -c 'echo stopped >> {stops}'",
                },
            )
            await client.submit(client.name("idle"), {"ExecStart": "/bin/true"})
            before = await client.wait_state(name, "active", "running")
    finally:
        assert fleet.stop() == 0, fleet.log()
    assert stops.read_text() == "stopped\n"  # stopping localfleet stops its units cleanly
    assert "output-line" in (state_dir / "logs" / f"{name}.log").read_text()

    fleet = FleetProcess(tmp_path, machines=2, state_dir=state_dir, port=port)
    try:
        async with aiohttp.ClientSession(base_url=fleet.url) as session:
            client = FleetClient(session, fleet, "restart")
            after = await client.wait_state(name, "active", "running")
            assert after["machineID"] == before["machineID"]

            async def started_twice() -> bool:  # "running" comes as the shell is spawned
                return starts.read_text() == "started\nstarted\n"

            await wait_for(started_twice, "the unit's second start")
            units = {unit["name"]: unit for unit in await client.paged("/units", "units")}
            assert (units[name]["desiredState"], units[name]["currentState"]) == (
                "launched",
                "launched",
            )
            assert units[client.name("idle")]["desiredState"] == "inactive"
    finally:
        assert fleet.stop() == 0, fleet.log()
    assert stops.read_text() == "stopped\nstopped\n"
    assert live_processes(**{MARKER_VARIABLE: fleet.marker}) == []


async def _read(path: pathlib.Path) -> str | None:
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text()
        return text if text.endswith("\n") else None
    return None


async def _async(value: T) -> T:
    return value


async def test_the_units_listing_follows_every_change_of_a_unit(client: FleetClient) -> None:
    """A page of units is written from each unit's JSON, kept until the unit changes: its
    options, its desired state, where it runs and what its agent did all show at once."""
    name = client.name("listed")

    async def listed() -> dict[str, Any] | None:
        units = {u["name"]: u for u in await client.paged("/units", "units")}
        return units.get(name)

    await client.submit(name, {"ExecStart": "/bin/sleep 300"})
    first = await listed()
    assert first is not None and (first["desiredState"], first["currentState"]) == (
        "inactive",
        "inactive",
    )
    await client.set_state(name, "launched")
    await client.wait_state(name, "active", "running")
    launched = await listed()
    assert launched == await client.unit(name) and launched is not None
    assert (launched["desiredState"], launched["currentState"]) == ("launched", "launched")
    assert launched["machineID"]
    await client.set_state(name, "inactive")
    await client.wait_gone(name)
    await client.put(name, {"name": name, "options": options_of({"ExecStart": "/bin/true"})})
    replaced = await listed()
    assert replaced is not None and replaced["options"] == options_of({"ExecStart": "/bin/true"})
    await client.destroy(name)
    assert await listed() is None
