"""``deployctl``: the command-line client of Deployster.

It speaks the REST API of the server (``POST /v1/services/{name}/deploys``, ``DELETE
.../deploys/{version}``, ``GET .../units``, ``POST .../tasks``) and keeps the original Go
deployctl's interface: the same global flags and environment variables, commands and aliases,
request bodies, messages (byte for byte), exit codes and ``list`` table.

What differs from the original, and why:

- ``run`` exits with the task's exit code, read from the last ``Exited (N)`` line of the stream,
  so that scripts and CI can tell a failed migration from a good one (the original always exited
  0). A stream that ends without that line (connection cut) is an error: exit 1.
- ``list`` checks the HTTP status: a non-2xx answer prints ``List failed :(`` and exits 1
  instead of printing an empty table.
- ``deploy --env KEY=VALUE`` (repeatable) sends ``"env": {...}`` in the deploy envelope, for
  the service's containers (a field the new server adds). ``destroy --timestamp TS`` sends the
  ``?timestamp=`` query the original server already accepted, to destroy one deploy's units.
  Without these flags the requests are the original's, byte for byte.
- ``run --timeout SECONDS --env KEY=VALUE --argv`` (before the service) send the new task
  fields: a time limit, environment variables, and the command as an argument list instead
  of one string joined with spaces.
- ``rollback SERVICE`` (new) asks the server to deploy the last successful release before the
  live one again (``POST .../rollback``).
- After ``Deploy triggered!`` it prints ``Deploy <id> is <state>.`` when the server returns the
  deploy record (the original server answered with an empty body).
- ``deploy --wait`` / ``rollback --wait`` (new) follow the deploy's event stream (``GET
  .../deploys/{id}/events``), print each step as it happens, and exit 0 when the deploy
  succeeded, 2 when it failed, 3 when it was rolled back, 4 when ``--timeout`` passed first
  (the deploy goes on). A dropped stream is resumed where it stopped (``Last-Event-ID``).
  ``deploy --wait-for-lock`` queues behind a running deploy of the service instead of failing.
- ``releases SERVICE`` and ``status [SERVICE]`` (new) show the deploy history and the live
  release with the health of its instances.
- Connection failures (server down, TLS) are one sentence naming the URL, and requests have
  timeouts (none for reading a task's stream, which may run for ten minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import ssl
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import aiohttp

from deployster import __version__

DEFAULT_URL = "http://localhost:3000"
DEFAULT_USERNAME = "deployster"
CONNECT_TIMEOUT = 30  # seconds to open a connection, for every command
REQUEST_TIMEOUT = 60  # seconds for a whole exchange, except `run` (tasks run up to 10 minutes)

INSTANCES_HELP = (
    "number of instances to deploy (optional, defaults to 0, which means current number running "
    "or 1 if none running)"
)
TABLE_HEADER = ("#", "Version", "Current state", "Desired state", "Machine ID", "Timestamp")
UNIT_COLUMNS = (
    "instance",
    "version",
    "current_state",
    "desired_state",
    "machine_id",
    "deploy_timestamp",
)
TABLE_PADDING = 4
WAIT_TIMEOUT = 900  # seconds `--wait` follows a deploy by default
RECONNECT_DELAY = 1.0  # seconds before following a dropped event stream again

# Exit codes of `deploy --wait` (1 stays "the request failed", as in the original).
EXIT_FAILED, EXIT_ROLLED_BACK, EXIT_TIMED_OUT = 2, 3, 4
FINAL_STATES = {"succeeded": 0, "failed": EXIT_FAILED, "rolled_back": EXIT_ROLLED_BACK}

# The task trailer is `\nExited (<code>) <error>\n`; the space is there even when <error> is empty.
_EXITED_LINE = re.compile(rb"Exited \((\d+)\) ")
# Only the start of a line can make it a trailer, so a task printing a huge line without a
# newline costs this much memory, not the whole line.
_LINE_HEAD = 64


# -- pure helpers ---------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[str]], padding: int = TABLE_PADDING) -> str:
    """Lay out rows as Go's text/tabwriter does with minwidth 0 and space padding.

    Every column but the last is as wide as its longest cell plus ``padding``; the last cell of
    a row is written as is (the Go format ended each row with ``\\n``, not ``\\t``).
    """
    widths = [max(len(row[i]) for row in rows) + padding for i in range(len(rows[0]) - 1)]
    return "".join(
        "".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + row[-1]
        + "\n"
        for row in rows
    )


def units_table(units: Sequence[Mapping[str, Any]]) -> str:
    """The ``list`` table: header, a row of dashes as long as each header, one row per unit."""
    rows = [TABLE_HEADER, tuple("-" * len(title) for title in TABLE_HEADER)]
    rows += [tuple(_cell(unit.get(key)) for key in UNIT_COLUMNS) for unit in units]
    return format_table(rows)


def _cell(value: Any) -> str:
    # A missing field prints as an empty cell, as Go's zero value did.
    return "" if value is None else str(value)


def parse_units(body: bytes) -> list[Mapping[str, Any]]:
    """Decode a ``GET .../units`` body; raises ValueError when it is not ``{"units": [...]}``."""
    payload = json.loads(body)
    shape_error = ValueError('expected a JSON object {"units": [...]} with one object per unit')
    if not isinstance(payload, dict):
        raise shape_error
    units = payload.get("units")
    if units is None:
        return []  # Go decoded a missing or null list as empty
    if not isinstance(units, list) or not all(isinstance(unit, dict) for unit in units):
        raise shape_error
    return units


def parse_env_pair(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` from ``--env``; the value may be empty or contain ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


class SseParser:
    """Server-Sent Events, line by line: ``feed`` returns an event at each blank line."""

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, str] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._fields.clear()
                return None
            event = {**self._fields, "data": "\n".join(self._data)}
            self._fields, self._data = {}, []
            return event
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive ping
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name in ("id", "event"):
            self._fields[name] = value
        return None


def progress_line(
    progress: Mapping[str, Any], started: float | None, previous: str | None = None
) -> str:
    """One event of a deploy as ``--wait`` prints it: time since the first, kind, message.

    A message of several lines (a failed unit's last log lines) is indented under the
    first; one that repeats the ``previous`` message (the rollback's end after its start)
    keeps its first line only.
    """
    at = _epoch(progress.get("at"))
    offset = f"+{at - started:6.1f}s" if at is not None and started is not None else " " * 8
    message = str(progress.get("message", ""))
    if "\n" in message and message == previous:
        message = message.split("\n", 1)[0] + " (log lines above)"
    message = message.replace("\n", "\n" + " " * 11)
    return f"[{offset}] {progress.get('kind', '?')}: {message}"


def _epoch(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def releases_table(deploys: Sequence[Mapping[str, Any]]) -> str:
    """``releases``: newest first, the live release marked with ``*``."""
    live = next((d.get("id") for d in deploys if d.get("state") == "succeeded"), None)
    rows = [("", "Deploy", "Version", "State", "Source", "Created", "Instances", "Error")]
    for d in deploys:
        rows.append(
            (
                "*" if d.get("id") == live else "",
                _cell(d.get("id")),
                _cell(d.get("version")),
                _cell(d.get("state")),
                _cell(d.get("source")),
                _short_time(d.get("created_at")),
                str(len(d.get("units") or [])),
                # A failed unit's log lines, on the row: "first line | next | ...".
                " | ".join(line.strip() for line in _cell(d.get("error")).splitlines()),
            )
        )
    return format_table(rows, padding=2)


def status_text(services: Sequence[Mapping[str, Any]], detail: bool) -> str:
    """``status``: one row per service; with ``detail`` (one service) its instances too."""
    rows = [("Service", "Live", "Latest deploy", "State", "Healthy")]
    for svc in services:
        live = svc.get("live") or {}
        latest = svc.get("latest_deploy") or {}
        instances = svc.get("instances") or []
        healthy = sum(1 for i in instances if i.get("healthy"))
        rows.append(
            (
                _cell(svc.get("name")),
                _cell(live.get("version")) or "-",
                f"{_cell(latest.get('id'))} ({_cell(latest.get('version'))})",
                _cell(latest.get("state")),
                f"{healthy}/{len(instances)}",
            )
        )
    text = format_table(rows, padding=2)
    if detail:
        for svc in services:
            rows = [("Unit", "URL", "Healthy", "Routed", "Last probe")]
            rows += [
                (
                    _cell(i.get("unit")),
                    _cell(i.get("url")),
                    "yes" if i.get("healthy") else "no",
                    "yes" if i.get("routed") else "no",
                    _cell(i.get("last_probe")),
                )
                for i in svc.get("instances") or []
            ]
            text += "\n" + format_table(rows, padding=2)
    return text


def _short_time(text: Any) -> str:
    return str(text or "")[:19].replace("T", " ")


class TaskExitTracker:
    """Follows a task's output, chunk by chunk, to find the last ``Exited (N)`` line."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self._line = b""  # the start of the line still being received

    def feed(self, chunk: bytes) -> None:
        *lines, rest = (self._line + chunk).split(b"\n")
        for line in lines:
            match = _EXITED_LINE.match(line)
            if match:
                self.exit_code = int(match.group(1))
        self._line = rest[:_LINE_HEAD]


def process_exit_code(task_code: int) -> int:
    # A status the OS cannot carry would wrap (256 becomes 0, a success): report a failure.
    return task_code if task_code <= 255 else 1


# -- command line ---------------------------------------------------------------------------


class _ParserExit(Exception):  # noqa: N818 (argparse asked to exit: a signal, not an error)
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """Returns to main() instead of exiting, so that main() returns every exit code; usage
    errors exit 1, as the original's did."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"Error: {message}\n")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser; ``environ`` supplies the ``DEPLOYSTER_*`` defaults (an empty value counts as
    unset, as in the original)."""
    parser = _Parser(prog="deployctl", description="A simple command line client for deployster.")
    parser.add_argument("-v", "--version", action="version", version=f"deployctl {__version__}")
    global_flags = (
        ("--url", "DEPLOYSTER_URL", DEFAULT_URL, "a URL to the deployster instance"),
        ("--username", "DEPLOYSTER_USERNAME", DEFAULT_USERNAME, "username for authenticating"),
        ("--password", "DEPLOYSTER_PASSWORD", "", "password for authenticating"),
        ("--ca-cert", "DEPLOYSTER_CA_CERT", "", "PEM CA bundle to trust instead of the system's"),
    )
    for flag, env_var, default, help_text in global_flags:
        default = environ.get(env_var) or default
        parser.add_argument(flag, default=default, help=f"{help_text} [${env_var}]")

    commands = parser.add_subparsers(title="commands", metavar="command")

    deploy_cmd = commands.add_parser(
        "deploy", aliases=["d"], help="Deploys a given service and version to the cluster"
    )
    deploy_cmd.add_argument("service", nargs="?", help="service name")
    deploy_cmd.add_argument("version", nargs="?", help="version (image tag)")
    deploy_cmd.add_argument(
        "--skip-destroy-previous",
        action="store_true",
        help="skip old version destruction after successful deploy (if possible)",
    )
    deploy_cmd.add_argument("--instances", type=int, default=0, help=INSTANCES_HELP)
    deploy_cmd.add_argument(
        "--env",
        type=parse_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the service's containers (repeatable)",
    )
    deploy_cmd.add_argument(
        "--wait-for-lock",
        action="store_true",
        help="if another deploy of the service is running, queue behind it instead of failing",
    )
    _wait_flags(deploy_cmd)
    deploy_cmd.set_defaults(execute=_deploy, required=("service", "version"))

    run_cmd = commands.add_parser(
        "run", aliases=["r"], help="Runs a task for a given service and version"
    )
    # The flags go before the service: everything after the version is the task's command.
    run_cmd.add_argument(
        "--timeout",
        type=float,
        help="seconds before the task is killed (exit 124; server default 600)",
    )
    run_cmd.add_argument(
        "--env",
        type=parse_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the task's container (repeatable)",
    )
    run_cmd.add_argument(
        "--argv",
        action="store_true",
        help="send the command as an argument list, run as is (no shell, no joining with spaces)",
    )
    run_cmd.add_argument("service", nargs="?", help="service name")
    run_cmd.add_argument("version", nargs="?", help="version (image tag)")
    # Everything after the version is the task's command, its own dashed options included.
    run_cmd.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    run_cmd.set_defaults(execute=_run, required=("service", "version", "command"))

    destroy_cmd = commands.add_parser(
        "destroy", aliases=["x"], help="Destroys a given service and version"
    )
    destroy_cmd.add_argument("service", nargs="?", help="service name")
    destroy_cmd.add_argument("version", nargs="?", help="version (image tag)")
    destroy_cmd.add_argument(
        "--timestamp", help="destroy only the units of this deploy (YYYY.MM.DD-HH.MM.SS)"
    )
    destroy_cmd.set_defaults(execute=_destroy, required=("service", "version"))

    list_cmd = commands.add_parser(
        "list", aliases=["l"], help="Lists all instances of a given service running on the cluster"
    )
    list_cmd.add_argument("service", nargs="?", help="service name")
    list_cmd.set_defaults(execute=_list, required=("service",))

    rollback_cmd = commands.add_parser(
        "rollback", help="Deploys the last successful release before the live one again"
    )
    rollback_cmd.add_argument("service", nargs="?", help="service name")
    _wait_flags(rollback_cmd)
    rollback_cmd.set_defaults(execute=_rollback, required=("service",))

    releases_cmd = commands.add_parser(
        "releases", help="Shows the deploy history of a service, newest first"
    )
    releases_cmd.add_argument("service", nargs="?", help="service name")
    releases_cmd.set_defaults(execute=_releases, required=("service",))

    status_cmd = commands.add_parser(
        "status",
        help="Shows each service's live release and instance health (one service: its instances too)",
    )
    status_cmd.add_argument("service", nargs="?", help="service name (default: every service)")
    status_cmd.set_defaults(execute=_status, required=())
    return parser


def _wait_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--wait",
        action="store_true",
        help="follow the deploy until it ends; exit 0 succeeded, 2 failed, 3 rolled back, 4 timed out",
    )
    command.add_argument(
        "--timeout",
        type=float,
        default=WAIT_TIMEOUT,
        help=f"seconds --wait follows the deploy (default {WAIT_TIMEOUT})",
    )


# -- talking to the server ------------------------------------------------------------------


class _Api:
    """Builds request URLs under ``--url`` (which may carry a path prefix)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    def service_url(self, service: str, *parts: str) -> str:
        segments = ("v1", "services", service, *parts)
        return self.base_url + "".join("/" + quote(segment, safe="") for segment in segments)


def _json_body(payload: Mapping[str, Any]) -> bytes:
    # Compact like Go's json.Marshal, so the bytes on the wire are the original's.
    return json.dumps(payload, separators=(",", ":")).encode()


async def _report_failure(headline: str, response: aiohttp.ClientResponse) -> int:
    body = await response.read()
    print(headline)
    print("-- Response Status:", f"{response.status} {response.reason or ''}".rstrip())
    print("-- Response Body:", body.decode(errors="replace"))
    return 1


async def _deploy(args: argparse.Namespace, api: _Api) -> int:
    if args.skip_destroy_previous:
        print("Skipping destruction of previous version...")
    # Key order and omissions as the original's: instance_count only when set, never timestamp.
    deploy: dict[str, Any] = {
        "version": args.version,
        "destroy_previous": not args.skip_destroy_previous,
    }
    if args.instances:
        deploy["instance_count"] = args.instances
    if args.env:
        deploy["env"] = dict(args.env)
    if args.wait_for_lock:
        deploy["wait_for_lock"] = True
    url = api.service_url(args.service, "deploys")
    return await _start_deploy(args, api, url, _json_body({"deploy": deploy}), "Deploy")


async def _rollback(args: argparse.Namespace, api: _Api) -> int:
    return await _start_deploy(
        args, api, api.service_url(args.service, "rollback"), b"", "Rollback"
    )


async def _start_deploy(
    args: argparse.Namespace, api: _Api, url: str, body: bytes, what: str
) -> int:
    async with api.session.post(
        url, data=body, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    ) as response:
        # 202: queued behind another deploy, or fleet is slow to accept the units.
        if response.status not in (201, 202):
            return await _report_failure(f"{what} failed :(", response)
        print(f"{what} triggered!")
        record = _deploy_record(await response.read())
        if record.get("id") and record.get("state"):
            queued = " (queued behind another deploy)" if record.get("step") == "queued" else ""
            print(f"Deploy {record['id']} is {record['state']}{queued}.")
    if not args.wait:
        return 0
    if not record.get("id"):
        return _error("the server did not say which deploy it started, so it cannot be followed")
    return await _follow(api, args.service, str(record["id"]), args.timeout)


async def _follow(api: _Api, service: str, deploy_id: str, timeout: float) -> int:
    """Print the deploy's events as they come; the exit code tells how it ended."""
    url = api.service_url(service, "deploys", deploy_id, "events")
    last_id = ""
    started: float | None = None
    previous: str | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                headers = {"Accept": "text/event-stream"}
                if last_id:
                    headers["Last-Event-ID"] = last_id
                try:
                    async with api.session.get(url, headers=headers) as response:
                        if response.status != 200:
                            return await _report_failure("Following the deploy failed :(", response)
                        parser = SseParser()
                        async for raw in response.content:
                            event = parser.feed(raw.decode(errors="replace"))
                            if event is None:
                                continue
                            last_id = event.get("id", last_id)
                            progress = json.loads(event["data"])
                            started = started if started is not None else _epoch(progress.get("at"))
                            print(progress_line(progress, started, previous), flush=True)
                            previous = progress.get("message")
                            kind = progress.get("kind")
                            if kind in FINAL_STATES:
                                print(f"Deploy {deploy_id} {str(kind).replace('_', ' ')}.")
                                return FINAL_STATES[kind]
                except (aiohttp.ClientError, ValueError) as error:
                    print(
                        f"(the event stream broke: {_connection_failure(error)}; following again)",
                        file=sys.stderr,
                    )
                await asyncio.sleep(RECONNECT_DELAY)
    except TimeoutError:
        print(
            f"Stopped waiting after {timeout:g} s; deploy {deploy_id} goes on "
            f"(deployctl releases {service}).",
            file=sys.stderr,
        )
        return EXIT_TIMED_OUT


async def _releases(args: argparse.Namespace, api: _Api) -> int:
    async with api.session.get(api.service_url(args.service, "deploys")) as response:
        if response.status != 200:
            return await _report_failure("Listing releases failed :(", response)
        payload = await response.json(content_type=None)
    deploys = payload.get("deploys") or []
    if not deploys:
        return _error(f"the server knows no deploy of service {args.service!r}")
    sys.stdout.write(releases_table(deploys))
    return 0


async def _status(args: argparse.Namespace, api: _Api) -> int:
    async with api.session.get(api.base_url + "/v1/services") as response:
        if response.status != 200:
            return await _report_failure("Status failed :(", response)
        payload = await response.json(content_type=None)
    services = payload.get("services") or []
    if args.service:
        services = [s for s in services if s.get("name") == args.service]
        if not services:
            return _error(f"the server knows no deploy of service {args.service!r}")
    sys.stdout.write(status_text(services, detail=bool(args.service)))
    return 0


def _deploy_record(body: bytes) -> Mapping[str, Any]:
    # The original server answered 201 with an empty body; the new one sends {"deploy": {...}}.
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    record = payload.get("deploy") if isinstance(payload, dict) else None
    return record if isinstance(record, dict) else {}


async def _run(args: argparse.Namespace, api: _Api) -> int:
    # Without the new flags the body is the original's, byte for byte.
    task: dict[str, Any] = {
        "version": args.version,
        "command": list(args.command) if args.argv else " ".join(args.command),
    }
    if args.timeout is not None:
        task["timeout"] = int(args.timeout) if args.timeout.is_integer() else args.timeout
    if args.env:
        task["env"] = dict(args.env)
    url = api.service_url(args.service, "tasks")
    tracker = TaskExitTracker()
    async with api.session.post(url, data=_json_body({"task": task})) as response:
        if response.status != 200:
            return await _report_failure("Task failed to launch :(", response)
        sys.stdout.flush()  # text printed before must come before the raw bytes
        out = sys.stdout.buffer
        try:
            async for chunk in response.content.iter_any():
                out.write(chunk)
                out.flush()
                tracker.feed(chunk)
        except aiohttp.ClientError:
            pass  # the stream was cut; whether its trailer had arrived decides below
    if tracker.exit_code is None:
        print(
            f"Error: the task stream from {api.base_url} ended before the task reported its exit "
            "status, so its outcome is unknown.",
            file=sys.stderr,
        )
        return 1
    return process_exit_code(tracker.exit_code)


async def _destroy(args: argparse.Namespace, api: _Api) -> int:
    url = api.service_url(args.service, "deploys", args.version)
    params = {"timestamp": args.timestamp} if args.timestamp else None
    async with api.session.delete(url, params=params) as response:
        if response.status != 204:
            return await _report_failure("Destroy failed :(", response)
    print("Destroy triggered!")
    return 0


async def _list(args: argparse.Namespace, api: _Api) -> int:
    async with api.session.get(api.service_url(args.service, "units")) as response:
        if not 200 <= response.status < 300:
            return await _report_failure("List failed :(", response)
        body = await response.read()
    try:
        units = parse_units(body)
    except ValueError as error:
        return _error(str(error))
    sys.stdout.write(units_table(units))
    return 0


def _connection_failure(error: BaseException) -> str:
    """Why an exchange failed, in a few words; the sentence around it names the URL."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        cert_error = error.certificate_error
        detail = getattr(cert_error, "verify_message", None) or cert_error
        return f"TLS certificate verification failed ({detail})"
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        if isinstance(os_error, ssl.SSLError):
            return f"TLS handshake failed ({os_error.reason or os_error})"
        if os_error.errno and os_error.errno > 0:
            return os.strerror(os_error.errno)  # asyncio's own text says "Connect call failed"
        return os_error.strerror or str(os_error)
    # Only the connect deadline raises ServerTimeoutError here (no read deadline is set).
    if isinstance(error, aiohttp.ServerTimeoutError):
        return f"no connection within {CONNECT_TIMEOUT} seconds"
    if isinstance(error, TimeoutError):
        return f"no complete answer within {REQUEST_TIMEOUT} seconds"
    return str(error) or type(error).__name__


async def _execute(args: argparse.Namespace, ssl_context: ssl.SSLContext | bool) -> int:
    # A task streams for up to ten minutes, `--wait` follows a deploy: only their connections
    # get a deadline.
    total = None if args.execute is _run or getattr(args, "wait", False) else REQUEST_TIMEOUT
    session = aiohttp.ClientSession(
        headers={
            "Authorization": basic_auth(args.username, args.password),
            # The original sent this on every request, GET and DELETE included.
            "Content-Type": "application/json",
            "User-Agent": f"deployctl/{__version__}",
        },
        timeout=aiohttp.ClientTimeout(total=total, connect=CONNECT_TIMEOUT),
        connector=aiohttp.TCPConnector(ssl=ssl_context),
    )
    async with session:
        try:
            code: int = await args.execute(args, _Api(args.url, session))
            return code
        except (aiohttp.ClientError, TimeoutError) as error:
            return _error(f"cannot reach Deployster at {args.url}: {_connection_failure(error)}")


def basic_auth(username: str, password: str) -> str:
    """The ``Authorization`` value; UTF-8, as Go sent the raw bytes of ``user:password``."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _ssl_context(ca_cert: str) -> ssl.SSLContext | bool:
    if not ca_cert:
        return True  # the system's roots
    # With cafile, only that bundle is trusted (the system roots are not loaded).
    return ssl.create_default_context(cafile=ca_cert)


def _error(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return 1


def _check_arguments(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments (missing ones worded as the original's), or None."""
    for name in args.required:
        if not getattr(args, name):
            return f"{name.capitalize()} required"
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"--url must be an http:// or https:// URL, got {args.url!r}"
    if ":" in args.username:
        return "--username cannot contain ':' (HTTP basic auth uses it as the separator)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run deployctl with ``argv`` (default: the process's arguments); returns the exit code."""
    parser = build_parser(os.environ)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except _ParserExit as exit_:
        return exit_.status
    if not hasattr(args, "execute"):
        parser.print_help()  # no command: the original showed its help and exited 0
        return 0
    problem = _check_arguments(args)
    if problem:
        return _error(problem)
    try:
        ssl_context = _ssl_context(args.ca_cert)
    except OSError as error:  # a missing file, or ssl.SSLError for a bad bundle
        return _error(f"cannot use the CA certificate {args.ca_cert!r}: {error}")
    return asyncio.run(_execute(args, ssl_context))


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()
