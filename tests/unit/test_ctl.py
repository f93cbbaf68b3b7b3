"""deployctl (deployster/ctl.py): parity with the original Go client, and what it adds.

The HTTP tests call ``main()`` as the console script does, against a real aiohttp server on
127.0.0.1 whose answers follow the original server's wire contract
(``docs/compatibility.md`` §2, §9). ``main()`` runs its own event loop with
``asyncio.run``, so the server lives on a second loop in a background thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from helpers import self_signed as self_signed_cert
from multidict import CIMultiDict

from deployster import __version__
from deployster.ctl import (
    INSTANCES_HELP,
    TaskExitTracker,
    basic_auth,
    build_parser,
    format_table,
    main,
    parse_env_pair,
    parse_units,
    process_exit_code,
    run,
    units_table,
)

EXAMPLE_TABLE = (
    "#    Version    Current state    Desired state    Machine ID    Timestamp\n"
    "-    -------    -------------    -------------    ----------    ---------\n"
    "1    0fbb804    launched         launched         d6e4b05a      2015.03.02-00.31.45\n"
)
EXAMPLE_UNIT = {
    "service": "hello-world",
    "instance": "1",
    "version": "0fbb804",
    "current_state": "launched",
    "desired_state": "launched",
    "machine_id": "d6e4b05a",
    "deploy_timestamp": "2015.03.02-00.31.45",
}
TOO_MANY_VERSIONS = (
    "Too many versions are running.  Destroying previous units is not supported when more than "
    "one version is currently running."
)
SUCCESS_TRAILER = b"\nExited (0) \n"
FAILURE_TRAILER = b"\nExited (127) Something went wrong\n"
TIMEOUT_TRAILER = b"\nExited (124) The task timed out after 10m0s. Forcefully removing container.\n"
T = TypeVar("T")


# -- a local Deployster speaking the original's wire contract -------------------------------


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class LocalServer:
    """An aiohttp app on 127.0.0.1 (free port), on its own loop in a daemon thread."""

    def __init__(
        self, routes: list[web.RouteDef], scheme: str, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.received: list[Received] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = self._call(self._start(routes, ssl_context))
        port = self._runner.addresses[0][1]
        self.url = f"{scheme}://127.0.0.1:{port}"

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _start(
        self, routes: list[web.RouteDef], ssl_context: ssl.SSLContext | None
    ) -> web.AppRunner:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.received.append(
                Received(
                    request.method,
                    request.path,
                    dict(request.query),
                    CIMultiDict(request.headers),
                    await request.read(),
                )
            )
            return await handler(request)

        app = web.Application(middlewares=[record])
        app.add_routes(routes)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        return runner

    @property
    def only_request(self) -> Received:
        assert len(self.received) == 1, self.received
        return self.received[0]

    def stop(self) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., LocalServer]]:
    servers: list[LocalServer] = []

    def start(
        *routes: web.RouteDef, scheme: str = "http", ssl_context: ssl.SSLContext | None = None
    ) -> LocalServer:
        server = LocalServer(list(routes), scheme, ssl_context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def no_deployster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's DEPLOYSTER_* variables must not change what the tests send."""
    for name in ("URL", "USERNAME", "PASSWORD", "CA_CERT"):
        monkeypatch.delenv(f"DEPLOYSTER_{name}", raising=False)


def deployctl(server: LocalServer, *argv: str) -> int:
    return main(["--url", server.url, "--password", "s3cret", *argv])


def error_envelope(description: str, status: int, error: str = "error") -> web.Response:
    # Go's JSON encoder ends the body with a newline; deployctl prints the body as is.
    body = json.dumps({"description": description, "error": error}) + "\n"
    return web.Response(status=status, text=body, content_type="application/json")


def assert_original_headers(request: Received, username: str = "deployster") -> None:
    credentials = base64.b64encode(f"{username}:s3cret".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {credentials}"
    assert request.headers["Content-Type"] == "application/json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the list table -------------------------------------------------------------------------


def test_format_table_matches_the_original_example() -> None:
    rows = [
        ("#", "Version", "Current state", "Desired state", "Machine ID", "Timestamp"),
        ("-", "-------", "-------------", "-------------", "----------", "---------"),
        ("1", "0fbb804", "launched", "launched", "d6e4b05a", "2015.03.02-00.31.45"),
    ]
    assert format_table(rows) == EXAMPLE_TABLE


def test_format_table_widens_each_column_to_its_longest_cell_plus_four() -> None:
    rows = [("#", "Version", "Timestamp"), ("12", "v", "t"), ("3", "2024-rc.1", "")]
    assert format_table(rows) == (
        "#     Version      Timestamp\n12    v            t\n3     2024-rc.1    \n"
    )


def test_units_table_with_wide_cells() -> None:
    unit = {
        "instance": "10",
        "version": "0fbb804a",
        "current_state": "inactive",
        "desired_state": "launched",
        "machine_id": "d6e4b05a5b0c4a1e9d3f",
        "deploy_timestamp": "2015.03.02-00.31.45",
    }
    assert units_table([EXAMPLE_UNIT, unit]) == (
        "#     Version     Current state    Desired state    Machine ID              Timestamp\n"
        "-     -------     -------------    -------------    ----------              ---------\n"
        "1     0fbb804     launched         launched         d6e4b05a                2015.03.02-00.31.45\n"
        "10    0fbb804a    inactive         launched         d6e4b05a5b0c4a1e9d3f    2015.03.02-00.31.45\n"
    )


def test_units_table_without_units_is_header_and_dashes() -> None:
    # The example's widths all come from its header, so its first two lines are the same.
    assert units_table([]) == "".join(EXAMPLE_TABLE.splitlines(keepends=True)[:2])


@pytest.mark.parametrize("body", [b'{"units":[]}', b'{"units":null}', b"{}"])
def test_parse_units_empty_lists(body: bytes) -> None:
    assert parse_units(body) == []


@pytest.mark.parametrize("body", [b"oops", b"[]", b'{"units":{}}', b'{"units":["1"]}'])
def test_parse_units_rejects_other_shapes(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_units(body)


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deploy"], "Service required"),
        (["d", "hello-world"], "Version required"),
        (["run"], "Service required"),
        (["r", "hello-world"], "Version required"),
        (["run", "hello-world", "0fbb804"], "Command required"),
        (["destroy"], "Service required"),
        (["x", "hello-world"], "Version required"),
        (["list"], "Service required"),
        (["l", ""], "Service required"),
    ],
)
def test_missing_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    assert capsys.readouterr() == ("", f"Error: {message}\n")


def test_defaults_come_from_the_environment_and_flags_win() -> None:
    environ = {
        "DEPLOYSTER_URL": "https://deployster.example",
        "DEPLOYSTER_USERNAME": "ops",
        "DEPLOYSTER_PASSWORD": "pw",
        "DEPLOYSTER_CA_CERT": "ca.pem",
    }
    args = build_parser(environ).parse_args(["list", "svc"])
    assert (args.url, args.username, args.password, args.ca_cert) == (
        "https://deployster.example",
        "ops",
        "pw",
        "ca.pem",
    )
    args = build_parser(environ).parse_args(["--url", "http://other:3000", "list", "svc"])
    assert args.url == "http://other:3000"


def test_defaults_without_environment_and_empty_variables_count_as_unset() -> None:
    args = build_parser({"DEPLOYSTER_URL": "", "DEPLOYSTER_USERNAME": ""}).parse_args(["l", "s"])
    assert (args.url, args.username, args.password, args.ca_cert) == (
        "http://localhost:3000",
        "deployster",
        "",
        "",
    )


def test_deploy_flags_keep_the_original_help_and_defaults() -> None:
    parser = build_parser({})
    args = parser.parse_args(["deploy", "svc", "v1"])
    assert (args.skip_destroy_previous, args.instances, args.env) == (False, 0, [])
    assert INSTANCES_HELP == (
        "number of instances to deploy (optional, defaults to 0, which means current number "
        "running or 1 if none running)"
    )


def test_run_keeps_the_tasks_own_options() -> None:
    args = build_parser({}).parse_args(["run", "svc", "v1", "rake", "--trace", "-h"])
    assert args.command == ["rake", "--trace", "-h"]


@pytest.mark.parametrize(
    ("text", "pair"),
    [("A=1", ("A", "1")), ("EMPTY=", ("EMPTY", "")), ("URL=a=b", ("URL", "a=b"))],
)
def test_parse_env_pair(text: str, pair: tuple[str, str]) -> None:
    assert parse_env_pair(text) == pair


@pytest.mark.parametrize("bad", ["NOPE", "=value"])
def test_malformed_env_pair_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "svc", "v1", "--env", bad]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith(f"Error: argument --env: expected KEY=VALUE, got {bad!r}\n")


def test_basic_auth_is_utf8_like_go() -> None:
    assert (
        basic_auth("deployster", "pässwörd")
        == "Basic " + base64.b64encode("deployster:pässwörd".encode()).decode()
    )


def test_username_with_a_colon_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--username", "a:b", "list", "svc"]) == 1
    assert capsys.readouterr().err == (
        "Error: --username cannot contain ':' (HTTP basic auth uses it as the separator)\n"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"deployctl {__version__}\n"


def test_console_script_exits_with_mains_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["deployctl", "list"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 1


def test_url_without_scheme_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "localhost:3000", "list", "svc"]) == 1
    assert capsys.readouterr().err == (
        "Error: --url must be an http:// or https:// URL, got 'localhost:3000'\n"
    )


def test_missing_ca_bundle_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.pem"
    assert main(["--ca-cert", str(missing), "list", "svc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error: cannot use the CA certificate '{missing}': ")
    assert "Traceback" not in err


# -- task exit codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        (b"migrating\n" + SUCCESS_TRAILER, 0),
        (b"oops\n" + FAILURE_TRAILER, 127),
        (b"slow\n" + TIMEOUT_TRAILER, 124),
        (FAILURE_TRAILER + b"WARNING: Container could not be cleaned up (gone)\n", 127),
        (b"Exited (3) by the task itself\n" + SUCCESS_TRAILER, 0),
        (b"migrating\n", None),
        (b"ERROR: attach failed\n", None),
        (b"echo Exited (3) \n", None),
        (b"\nExited (0) ", None),  # the trailer's line never ended: the stream was cut
    ],
)
def test_task_exit_tracker(stream: bytes, code: int | None) -> None:
    tracker = TaskExitTracker()
    tracker.feed(stream)
    assert tracker.exit_code == code


def test_task_exit_tracker_across_chunks_and_long_lines() -> None:
    tracker = TaskExitTracker()
    for chunk in (b"x" * 100_000, b"\nExi", b"ted (4", b"2) boom", b"\n"):
        tracker.feed(chunk)
    assert tracker.exit_code == 42


def test_an_exit_code_the_os_cannot_carry_is_a_failure() -> None:
    assert [process_exit_code(code) for code in (0, 124, 255, 256)] == [0, 124, 255, 1]


# -- deploy ---------------------------------------------------------------------------------


def test_deploy_sends_the_original_body_and_reports_201(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def created(request: web.Request) -> web.Response:
        return web.Response(status=201, content_type="application/json")  # the original's

    server = serve(web.post("/v1/services/{name}/deploys", created))
    assert deployctl(server, "deploy", "hello-world", "0fbb804") == 0

    assert capsys.readouterr() == ("Deploy triggered!\n", "")
    request = server.only_request
    assert (request.method, request.path) == ("POST", "/v1/services/hello-world/deploys")
    assert request.body == b'{"deploy":{"version":"0fbb804","destroy_previous":true}}'
    assert_original_headers(request)


def test_deploy_with_every_flag_and_the_new_record(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def created(request: web.Request) -> web.Response:
        deploy = (await request.json())["deploy"]
        record = {"id": "d-7", "state": "pending", "version": deploy["version"]}
        return web.json_response({"deploy": record}, status=201)

    server = serve(web.post("/v1/services/{name}/deploys", created))
    argv = ["d", "hello-world", "0fbb804", "--skip-destroy-previous", "--instances", "3"]
    assert deployctl(server, *argv, "--env", "A=1", "--env", "B=x=y", "--env", "A=2") == 0

    assert capsys.readouterr().out == (
        "Skipping destruction of previous version...\nDeploy triggered!\nDeploy d-7 is pending.\n"
    )
    assert server.only_request.json() == {
        "deploy": {
            "version": "0fbb804",
            "destroy_previous": False,
            "instance_count": 3,
            "env": {"A": "2", "B": "x=y"},
        }
    }


def test_rollback_posts_to_the_service_and_reports_the_new_deploy(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def created(request: web.Request) -> web.Response:
        return web.json_response(
            {"deploy": {"id": "d-9", "state": "running", "version": "v1"}}, status=201
        )

    server = serve(web.post("/v1/services/{name}/rollback", created))
    assert deployctl(server, "rollback", "hello-world") == 0
    assert capsys.readouterr() == ("Rollback triggered!\nDeploy d-9 is running.\n", "")
    assert (server.only_request.method, server.only_request.path) == (
        "POST",
        "/v1/services/hello-world/rollback",
    )


def test_rollback_refused_exits_1(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def refused(request: web.Request) -> web.Response:
        return error_envelope(
            "Service 'hello-world' has no earlier successful release to roll back to.", 409
        )

    server = serve(web.post("/v1/services/{name}/rollback", refused))
    assert deployctl(server, "rollback", "hello-world") == 1
    out = capsys.readouterr().out
    assert out.startswith("Rollback failed :(\n-- Response Status: 409 Conflict\n")


def test_deploy_failure_prints_status_and_body(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def refused(request: web.Request) -> web.Response:
        return error_envelope(TOO_MANY_VERSIONS, 400)

    server = serve(web.post("/v1/services/{name}/deploys", refused))
    assert deployctl(server, "deploy", "hello-world", "0fbb804") == 1

    body = json.dumps({"description": TOO_MANY_VERSIONS, "error": "error"})
    assert capsys.readouterr() == (
        f"Deploy failed :(\n-- Response Status: 400 Bad Request\n-- Response Body: {body}\n\n",
        "",
    )


# -- destroy --------------------------------------------------------------------------------


async def no_content(request: web.Request) -> web.Response:
    return web.Response(status=204)


def test_destroy(serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = serve(web.delete("/v1/services/{name}/deploys/{version}", no_content))
    assert deployctl(server, "destroy", "hello-world", "0fbb804") == 0

    assert capsys.readouterr() == ("Destroy triggered!\n", "")
    request = server.only_request
    assert (request.method, request.path, request.query) == (
        "DELETE",
        "/v1/services/hello-world/deploys/0fbb804",
        {},
    )
    assert_original_headers(request)


def test_destroy_one_timestamp(serve: Callable[..., LocalServer]) -> None:
    server = serve(web.delete("/v1/services/{name}/deploys/{version}", no_content))
    argv = ["x", "hello-world", "0fbb804", "--timestamp", "2015.03.02-00.31.45"]
    assert deployctl(server, *argv) == 0
    assert server.only_request.query == {"timestamp": "2015.03.02-00.31.45"}


def test_destroy_failure(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def fleet_down(request: web.Request) -> web.Response:
        return error_envelope("dial unix /var/run/fleet.sock: no such file", 500, "net.OpError")

    server = serve(web.delete("/v1/services/{name}/deploys/{version}", fleet_down))
    assert deployctl(server, "destroy", "hello-world", "0fbb804") == 1

    out = capsys.readouterr().out
    assert out.startswith("Destroy failed :(\n-- Response Status: 500 Internal Server Error\n")
    assert out.endswith('"error": "net.OpError"}\n\n')


# -- list -----------------------------------------------------------------------------------


def test_list(serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]) -> None:
    async def units(request: web.Request) -> web.Response:
        return web.json_response({"units": [EXAMPLE_UNIT]})

    server = serve(web.get("/v1/services/{name}/units", units))
    assert deployctl(server, "list", "hello-world") == 0

    assert capsys.readouterr() == (EXAMPLE_TABLE, "")
    request = server.only_request
    assert (request.method, request.path) == ("GET", "/v1/services/hello-world/units")
    assert_original_headers(request)


def test_list_failure_checks_the_status(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def fleet_down(request: web.Request) -> web.Response:
        return error_envelope("fleet is down", 500, "googleapi.Error")

    server = serve(web.get("/v1/services/{name}/units", fleet_down))
    assert deployctl(server, "l", "hello-world") == 1
    assert capsys.readouterr().out.startswith(
        "List failed :(\n-- Response Status: 500 Internal Server Error\n-- Response Body: {"
    )


def test_list_undecodable_body(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>proxy page</html>")

    server = serve(web.get("/v1/services/{name}/units", garbage))
    assert deployctl(server, "list", "hello-world") == 1
    assert capsys.readouterr() == ("", "Error: Expecting value: line 1 column 1 (char 0)\n")


# -- run ------------------------------------------------------------------------------------


def task_stream(*chunks: bytes, cut: bool = False) -> Handler:
    """A tasks handler that streams ``chunks`` as chunked text/plain, as the original did."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "text/plain"
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.01)
        if cut:
            assert request.transport is not None
            request.transport.close()  # as when the original's 60 s write deadline fired
            return response
        await response.write_eof()
        return response

    return handler


@pytest.mark.parametrize(
    ("trailer", "code"), [(SUCCESS_TRAILER, 0), (FAILURE_TRAILER, 127), (TIMEOUT_TRAILER, 124)]
)
def test_run_streams_the_output_and_exits_with_the_tasks_code(
    trailer: bytes,
    code: int,
    serve: Callable[..., LocalServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    chunks = (b"== Migrating ==\n", b"done", trailer)
    server = serve(web.post("/v1/services/{name}/tasks", task_stream(*chunks)))
    command = ["bundle", "exec", "rake", "db:migrate"]
    assert deployctl(server, "run", "hello-world", "7bdae1c", *command) == code

    assert capsys.readouterr() == (b"".join(chunks).decode(), "")
    request = server.only_request
    assert (request.method, request.path) == ("POST", "/v1/services/hello-world/tasks")
    assert request.body == b'{"task":{"version":"7bdae1c","command":"bundle exec rake db:migrate"}}'
    assert_original_headers(request)


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (
            ["--timeout", "120"],
            b'{"task":{"version":"v1","command":"rake db:migrate","timeout":120}}',
        ),
        (
            ["--timeout", "2.5", "--env", "A=1", "--env", "B=x=y"],
            b'{"task":{"version":"v1","command":"rake db:migrate","timeout":2.5,"env":{"A":"1","B":"x=y"}}}',
        ),
        (["--argv"], b'{"task":{"version":"v1","command":["rake","db:migrate"]}}'),
    ],
)
def test_run_sends_the_new_task_fields(
    flags: list[str],
    body: bytes,
    serve: Callable[..., LocalServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = serve(web.post("/v1/services/{name}/tasks", task_stream(TIMEOUT_TRAILER)))
    assert deployctl(server, "run", *flags, "svc", "v1", "rake", "db:migrate") == 124
    assert server.only_request.body == body


def test_run_writes_output_before_the_task_ends(
    serve: Callable[..., LocalServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = threading.Event()

    class WatchedBuffer(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            written = super().write(data)
            if b"step 1" in self.getvalue():
                printed.set()
            return written

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        await response.write(b"step 1\n")
        seen = await asyncio.get_running_loop().run_in_executor(None, printed.wait, 5)
        await response.write(SUCCESS_TRAILER if seen else b"\nExited (99) not streamed\n")
        return response

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(WatchedBuffer()))
    server = serve(web.post("/v1/services/{name}/tasks", handler))
    assert deployctl(server, "run", "svc", "v1", "true") == 0


def test_run_that_fails_to_launch(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    async def no_image(request: web.Request) -> web.Response:
        return web.Response(status=500, text="ERROR: no such image: deployster/svc:v1\n")

    server = serve(web.post("/v1/services/{name}/tasks", no_image))
    assert deployctl(server, "r", "svc", "v1", "true") == 1
    assert capsys.readouterr() == (
        "Task failed to launch :(\n"
        "-- Response Status: 500 Internal Server Error\n"
        "-- Response Body: ERROR: no such image: deployster/svc:v1\n\n",
        "",
    )


@pytest.mark.parametrize("cut", [False, True], ids=["ended-without-trailer", "connection-cut"])
def test_run_without_an_exit_status_fails(
    cut: bool, serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    chunks = (b"== Migrating ==\n", b"ERROR: attach failed\n")
    server = serve(web.post("/v1/services/{name}/tasks", task_stream(*chunks, cut=cut)))
    assert deployctl(server, "run", "svc", "v1", "rake") == 1

    out, err = capsys.readouterr()
    assert out == b"".join(chunks).decode()
    assert err == (
        f"Error: the task stream from {server.url} ended before the task reported its exit "
        "status, so its outcome is unknown.\n"
    )


def test_run_cut_after_its_trailer_keeps_the_tasks_code(
    serve: Callable[..., LocalServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(web.post("/v1/services/{name}/tasks", task_stream(FAILURE_TRAILER, cut=True)))
    assert deployctl(server, "run", "svc", "v1", "rake") == 127
    assert capsys.readouterr() == (FAILURE_TRAILER.decode(), "")


# -- connection and TLS ---------------------------------------------------------------------


def test_nothing_listening_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--url", url, "list", "svc"]) == 1
    assert capsys.readouterr() == (
        "",
        f"Error: cannot reach Deployster at {url}: Connection refused\n",
    )


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing: install Debian's openssl package")
    return self_signed_cert(tmp_path)


def test_ca_cert_replaces_the_system_roots(
    self_signed: tuple[Path, Path],
    serve: Callable[..., LocalServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = serve(
        web.delete("/v1/services/{name}/deploys/{version}", no_content),
        scheme="https",
        ssl_context=context,
    )

    assert deployctl(server, "destroy", "svc", "v1") == 1
    assert capsys.readouterr().err == (
        f"Error: cannot reach Deployster at {server.url}: "
        "TLS certificate verification failed (self-signed certificate)\n"
    )
    assert deployctl(server, "--ca-cert", str(cert), "destroy", "svc", "v1") == 0
    assert capsys.readouterr().out == "Destroy triggered!\n"
