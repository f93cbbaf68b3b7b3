"""Hostile input against the real app (real etcd, localfleet, real sockets): every answer is a
4xx in the JSON envelope, fast, and nothing hangs, freezes the event loop or piles up.

One case per finding of the hostile-input review (ReDoS, webhook bodies read before the
secret, 500s for deep JSON and odd Last-Event-IDs, bodies without a deadline and aiohttp's
plain-text protocol errors, unbounded inputs), then the rest of the class: duplicate keys,
NaN, non-object JSON, wrong content types, odd path parameters, huge and negative numbers.
"""

from __future__ import annotations

import asyncio
import json
import resource
import secrets
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from integration.conftest import Api, basic_auth, running_api
from webhook_samples import REGISTRY_V1, registry, registry_event
from yarl import URL

from deployster.safejson import MAX_JSON_DEPTH
from deployster.web.app import ApiRunner, create_app
from deployster.web.context import SERVICES
from deployster.web.limits import MAX_UNVERIFIED

SECRET = f"hook-{secrets.token_hex(8)}"
BODY_TIMEOUT = 1.0


@pytest.fixture
async def hostile(aiohttp_client, etcd_endpoint: str, localfleet: str) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    async with running_api(
        aiohttp_client,
        etcd_endpoint,
        localfleet,
        webhook_secret=SECRET,
        body_timeout=BODY_TIMEOUT,
    ) as running:
        yield running


# -- raw HTTP over a socket ------------------------------------------------------------------


class Raw:
    """One connection to the test server, spoken to byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, api: Api) -> Raw:
        server = api.client.server
        return cls(*await asyncio.open_connection(server.host, server.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)
            }
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def closed_within(self, seconds: float) -> bool:
        """True when the server closes the connection within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                while await self.reader.read(65536):
                    pass
            return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def envelope(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert set(data) == {"error", "description"}, data
    return dict(data)


async def refused(resp: Any, status: int, words: str = "") -> dict[str, Any]:
    data = await resp.json()
    assert resp.status == status, data
    assert set(data) == {"error", "description"}
    assert words in data["description"], data
    return dict(data)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- finding 5: ReDoS ------------------------------------------------------------------------


async def test_a_backtracking_regexp_policy_answers_at_once_and_healthz_stays_up(
    hostile: Api,
) -> None:
    api = hostile
    body = {"policy": {"auto_deploy": {"enabled": True, "policy": "regexp:^(a+)+$"}}}
    resp = await api.client.put(api.url("/policy"), json=body, headers=api.auth)
    assert resp.status == 200, await resp.text()

    async def healthz_latency() -> float:
        started = time.monotonic()
        resp = await api.client.get("/healthz")
        assert resp.status == 200
        return time.monotonic() - started

    tag = "a" * 30 + "-"
    started = time.monotonic()
    push, health = await asyncio.gather(
        api.client.post(
            "/v1/webhooks/registry",
            data=registry(
                registry_event(
                    f"deployster/{api.service}", tag, f"sha256:{'0' * 64}", secrets.token_hex(8)
                )
            ),
            headers={"Content-Type": REGISTRY_V1, "Authorization": f"Bearer {SECRET}"},
        ),
        healthz_latency(),
    )
    [decision] = (await push.json())["decisions"]
    assert time.monotonic() - started < 2 and health < 2
    assert decision["decision"] == "ignored" and "does not match" in decision["reason"]


@pytest.mark.parametrize(
    "policy,words",
    [
        ("regexp:(a)\\1", "RE2"),  # a backreference: no linear-time engine runs it
        ("regexp:^(?=a)", "RE2"),  # lookahead
        ("regexp:((a{100}){100}){100}", "RE2"),  # a program past RE2's memory bound
        ("regexp:" + "a" * 300, "at most 256 characters"),
        ("glob:" + "*" * 300, "at most 256 characters"),
    ],
)
async def test_a_tag_policy_no_linear_engine_can_run_is_refused_when_stored(
    hostile: Api, policy: str, words: str
) -> None:
    api = hostile
    body = {"policy": {"auto_deploy": {"enabled": True, "policy": policy}}}
    resp = await api.client.put(api.url("/policy"), json=body, headers=api.auth)
    await refused(resp, 400, words)


# -- finding 6: webhook secrets before bodies ---------------------------------------------------


async def test_unauthenticated_unfinished_webhook_bodies_are_answered_and_let_go(
    hostile: Api,
) -> None:
    """100 wrong-secret deliveries that promise 1 MiB and send 1 KiB: each gets its 401 at
    once, without the body, and the server lets go of the connection soon after."""
    api = hostile
    before = rss_mib()
    head = request_head(
        "POST",
        "/v1/webhooks/registry",
        {
            "Content-Type": REGISTRY_V1,
            "Authorization": "Bearer wrong",
            "Content-Length": str(1024 * 1024),
        },
    )
    conns = [await Raw.open(api) for _ in range(100)]
    started = time.monotonic()
    await asyncio.gather(*(c.send(head + b"{" * 1024) for c in conns))
    answers = await asyncio.gather(*(c.answer() for c in conns))
    assert {status for status, _, _ in answers} == {401}
    assert all(envelope(body)["error"] == "unauthorized" for _, _, body in answers)
    assert time.monotonic() - started < 5
    # aiohttp reads and drops what is left for its lingering time (2 s), then closes.
    closed = await asyncio.gather(*(c.closed_within(6) for c in conns))
    assert all(closed)
    for c in conns:
        c.close()
    assert rss_mib() - before < 30


@pytest.mark.parametrize(
    "path,headers,expect_continue",
    [
        ("/v1/webhooks/registry", {"Authorization": "Bearer wrong"}, False),
        ("/v1/webhooks/dockerhub/wrong", {}, False),
        ("/v1/webhooks/harbor", {}, False),
        ("/v1/webhooks/registry", {"Authorization": f"Bearer {SECRET}"}, True),
        ("/v1/services/web/deploys", {"Authorization": "Basic d3Jvbmc6d3Jvbmc="}, False),
    ],
)
async def test_100_continue_only_after_the_secret_is_checked(
    hostile: Api, path: str, headers: dict[str, str], expect_continue: bool
) -> None:
    """A sender that waits for "100 Continue" is invited to send its body only once its
    secret (or basic auth) passed; aiohttp's default says it before any check."""
    api = hostile
    conn = await Raw.open(api)
    await conn.send(
        request_head(
            "POST",
            path,
            {
                **headers,
                "Content-Type": REGISTRY_V1,
                "Content-Length": "12",
                "Expect": "100-continue",
            },
        )
    )
    if expect_continue:
        assert await conn.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(b'{"events":[]')  # 12 bytes, not valid JSON
        status, _, body = await conn.answer()
        assert status == 400 and "not valid JSON" in envelope(body)["description"]
    else:
        status, _, body = await conn.answer()
        assert status == 401 and envelope(body)["error"] == "unauthorized"
    conn.close()


async def test_an_unknown_expectation_is_a_417(hostile: Api) -> None:
    api = hostile
    resp = await api.client.put(
        api.url("/policy"), json={"policy": {}}, headers={**api.auth, "Expect": "magic"}
    )
    await refused(resp, 417, "100-continue")


async def test_a_compressed_body_is_bounded_by_its_decompressed_size(hostile: Api) -> None:
    api = hostile
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    bomb = packer.compress(b" " * (256 * 1024 * 1024)) + packer.flush()  # 256 MiB in 250 KiB
    before = rss_mib()
    resp = await api.client.put(
        api.url("/policy"),
        data=bomb,
        headers={**api.auth, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    await refused(resp, 413, "1 MiB")
    assert rss_mib() - before < 30


async def test_the_registry_webhook_takes_the_secret_only_with_bearer(hostile: Api) -> None:
    api = hostile
    body = registry(registry_event(f"deployster/{api.service}", "v1", "sha256:0", "e1"))
    resp = await api.client.post(
        "/v1/webhooks/registry",
        data=body,
        headers={"Content-Type": REGISTRY_V1, "Authorization": SECRET},
    )
    await refused(resp, 401, "Bearer")


async def test_unsigned_ghcr_bodies_are_bounded_in_number_and_time(hostile: Api) -> None:
    """GHCR signs the body, so it must be read first: a badly formed signature is refused
    before, at most MAX_UNVERIFIED bodies are read at once (503 beyond), and each is cut at
    the body deadline."""
    api = hostile
    resp = await api.client.post(
        "/v1/webhooks/ghcr",
        data=b"{}",
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": "sha256=zz"},
    )
    await refused(resp, 401, "64 hex digits")

    head = request_head(
        "POST",
        "/v1/webhooks/ghcr",
        {
            "Content-Type": "application/json",
            "X-GitHub-Event": "package",
            "X-Hub-Signature-256": "sha256=" + "0" * 64,
            "Content-Length": "100000",
        },
    )
    slow = [await Raw.open(api) for _ in range(MAX_UNVERIFIED)]
    for c in slow:
        await c.send(head + b"{")
    await asyncio.sleep(0.2)  # every one of them is reading its body now
    extra = await Raw.open(api)
    await extra.send(head + b"{")
    status, headers, body = await extra.answer()
    assert status == 503 and headers["retry-after"] == "1", body
    assert envelope(body)["error"] == "unavailable"
    extra.close()
    started = time.monotonic()
    answers = await asyncio.gather(*(c.answer(timeout=BODY_TIMEOUT + 3) for c in slow))
    assert {status for status, _, _ in answers} == {408}
    assert time.monotonic() - started < BODY_TIMEOUT + 1
    assert all(await asyncio.gather(*(c.closed_within(4) for c in slow)))
    for c in slow:
        c.close()
    # The slots are free again: a signed delivery with a wrong signature gets its 401.
    resp = await api.client.post(
        "/v1/webhooks/ghcr",
        data=b"{}",
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "package",
            "X-Hub-Signature-256": "sha256=" + "0" * 64,
        },
    )
    await refused(resp, 401, "does not match")


# -- finding 7: 500s where a 4xx belongs ----------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 10_000])
async def test_deeply_nested_json_is_a_400_everywhere(hostile: Api, depth: int) -> None:
    api = hostile
    deep = nested(depth)
    for method, path, body, headers in (
        ("POST", api.url("/deploys"), f'{{"deploy": {deep}}}', api.auth),
        ("PUT", api.url("/policy"), f'{{"policy": {deep}}}', api.auth),
        ("POST", api.url("/tasks"), f'{{"task": {deep}}}', api.auth),
        ("POST", "/v1/webhooks/registry", f'{{"events": {deep}}}', {}),
    ):
        resp = await api.client.request(
            method,
            path,
            data=body.encode(),
            headers={
                **headers,
                "Content-Type": "application/json",
                "Authorization": headers.get("Authorization", f"Bearer {SECRET}"),
            },
        )
        await refused(resp, 400, f"nested deeper than {MAX_JSON_DEPTH}")
    # Brackets inside strings are text, not nesting.
    resp = await api.client.put(
        api.url("/policy"), json={"policy": {"health": {"path": "/" + "[" * 100}}}, headers=api.auth
    )
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("last_event_id", ["9" * 5000, "²", "١٢", "-1", "1e3", "0x1"])
async def test_a_last_event_id_that_is_not_a_small_ascii_number_is_a_400(
    hostile: Api, last_event_id: str
) -> None:
    api = hostile
    resp = await api.client.get(
        api.url("/deploys/20260101-000000-abcdef/events"),
        headers={**api.auth, "Last-Event-ID": last_event_id},
    )
    await refused(resp, 400, "Last-Event-ID")


# -- finding 8: bodies without a deadline, aiohttp's own errors -----------------------------


async def test_an_authenticated_chunked_body_that_never_ends_is_cut_at_the_deadline(
    hostile: Api,
) -> None:
    api = hostile
    conn = await Raw.open(api)
    head = request_head(
        "POST",
        api.url("/deploys"),
        {**api.auth, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    started = time.monotonic()
    await conn.send(head + b"1\r\n{\r\n")
    status, headers, body = await conn.answer(timeout=BODY_TIMEOUT + 3)
    elapsed = time.monotonic() - started
    assert status == 408 and envelope(body)["error"] == "request_timeout"
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 1
    assert headers["connection"] == "close"
    assert await conn.closed_within(4)
    conn.close()


async def test_an_authenticated_webhook_body_that_never_ends_is_cut_at_the_deadline(
    hostile: Api,
) -> None:
    api = hostile
    conn = await Raw.open(api)
    head = request_head(
        "POST",
        "/v1/webhooks/registry",
        {
            "Authorization": f"Bearer {SECRET}",
            "Content-Type": REGISTRY_V1,
            "Content-Length": "5000",
        },
    )
    await conn.send(head + b'{"events": [')
    status, _, body = await conn.answer(timeout=BODY_TIMEOUT + 3)
    assert status == 408 and envelope(body)["error"] == "request_timeout"
    assert await conn.closed_within(4)
    conn.close()


async def test_a_body_over_the_limit_is_refused_from_its_content_length(hostile: Api) -> None:
    api = hostile
    conn = await Raw.open(api)
    await conn.send(
        request_head(
            "PUT",
            api.url("/policy"),
            {**api.auth, "Content-Type": "application/json", "Content-Length": str(10**9)},
        )
    )
    status, _, body = await conn.answer(timeout=2)
    assert status == 413 and envelope(body)["error"] == "payload_too_large"
    conn.close()


@pytest.fixture
async def production_runner(hostile: Api) -> AsyncIterator[tuple[str, int]]:
    """The same services behind the runner ``deployster serve`` uses (ApiRunner)."""
    app = create_app(hostile.deployster.app[SERVICES], "deployster", "unused")
    runner = ApiRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "raw,words",
    [
        (b"FO\x00O / HTTP/1.1\r\nHost: x\r\n\r\n", "not valid HTTP"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "8190 bytes"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "8190 bytes"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", "not valid HTTP"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n", "not valid HTTP"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "not"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not valid HTTP"),  # TLS on plain
    ],
)
async def test_aiohttps_own_protocol_errors_answer_in_the_envelope(
    production_runner: tuple[str, int], raw: bytes, words: str
) -> None:
    reader, writer = await asyncio.open_connection(*production_runner)
    writer.write(raw)
    await writer.drain()
    conn = Raw(reader, writer)
    status, headers, body = await conn.answer(timeout=3)
    assert status == 400 and headers["content-type"].startswith("application/json")
    data = envelope(body)
    assert data["error"] == "invalid_request" and words in data["description"]
    assert await conn.closed_within(2)
    conn.close()


@pytest.mark.parametrize("path", ["/deploys", "/policy", "/tasks", "webhook"])
async def test_a_client_that_leaves_mid_body_costs_no_error_log(
    hostile: Api,
    production_runner: tuple[str, int],
    log_lines: list[dict[str, object]],
    path: str,
) -> None:
    """Served as ``deployster serve`` serves (aiohttp's test server cancels the route
    instead): the read fails with a ConnectionResetError, which is no server error."""
    api = hostile
    if path == "webhook":
        method, url = "POST", "/v1/webhooks/registry"
        headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": REGISTRY_V1}
    else:
        method, url = ("PUT" if path == "/policy" else "POST"), api.url(path)
        headers = {**basic_auth("deployster", "unused"), "Content-Type": "application/json"}
    _, writer = await asyncio.open_connection(*production_runner)
    writer.write(request_head(method, url, {**headers, "Content-Length": "5000"}) + b'{"x": "')
    await writer.drain()
    await asyncio.sleep(0.3)  # the route is reading the body now
    writer.transport.abort()
    await asyncio.sleep(0.3)
    assert [line for line in log_lines if line["log_level"] in ("error", "critical")] == []


# -- finding 9: unbounded inputs -------------------------------------------------------------


@pytest.mark.parametrize(
    "policy,field",
    [
        ({"health": {"interval": 1e-9}}, "policy.health.interval"),
        ({"health": {"interval": 0.05}}, "policy.health.interval"),
        ({"health": {"timeout": 0.001}}, "policy.health.timeout"),
        ({"health": {"path": "/a\u0000b"}}, "policy.health.path"),
        ({"health": {"path": "/" + "a" * 100_000}}, "policy.health.path"),
        ({"health": {"path": "/caf\u00e9"}}, "policy.health.path"),
        ({"health": {"path": "/a b"}}, "policy.health.path"),
        ({"health": {"path": "/a\r\nX-Evil: 1"}}, "policy.health.path"),
        ({"instance_deadline": 0.5}, "policy.instance_deadline"),
        ({"deploy_deadline": 1e12}, "policy.deploy_deadline"),
        ({"drain": -1}, "policy.drain"),
        ({"instance_count": -1}, "policy.instance_count"),
    ],
)
async def test_policy_values_out_of_bounds_are_a_400_naming_the_field(
    hostile: Api, policy: dict[str, Any], field: str
) -> None:
    api = hostile
    resp = await api.client.put(api.url("/policy"), json={"policy": policy}, headers=api.auth)
    await refused(resp, 400, f"'{field}'")
    # Nothing was stored: the policy is still the one the fixture saved.
    resp = await api.client.get(api.url("/policy"), headers=api.auth)
    assert (await resp.json())["policy"]["health"]["interval"] == 0.1


@pytest.mark.parametrize(
    "command,status,words",
    [
        ("x" * (2 * 1024 * 1024), 413, "1 MiB"),
        ("x" * 100_000, 400, "bytes, more than"),
        (["echo"] + ["a"] * 10_000, 400, "more than 512 arguments"),
    ],
)
async def test_a_task_command_too_large_is_refused_before_anything_is_stored(
    hostile: Api, command: str | list[str], status: int, words: str
) -> None:
    api = hostile
    resp = await api.client.post(
        api.url("/tasks"), json={"task": {"version": "v1", "command": command}}, headers=api.auth
    )
    await refused(resp, status, words)
    assert await api.deployster.tasks.store.list_tasks(api.service) == []


async def test_deploy_env_beyond_its_bounds_is_a_400(hostile: Api) -> None:
    api = hostile
    for env, words in (
        ({f"V{i}": "x" for i in range(300)}, "at most 256"),
        ({"BIG": "x" * 70_000}, "more than 65536"),
    ):
        resp = await api.client.post(
            api.url("/deploys"), json={"deploy": {"version": "v1", "env": env}}, headers=api.auth
        )
        await refused(resp, 400, words)
    assert await api.deployster.store.list_deploys(api.service) == []


# -- the rest of the class -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,words",
    [
        (b'{"deploy": {"version": "v1", "version": "v2"}}', "'version' twice"),
        (b'{"deploy": {"version": "v1", "instance_count": NaN}}', "NaN"),
        (b'{"deploy": {"version": "v1", "instance_count": -Infinity}}', "-Infinity"),
        (b'{"deploy": {"version": "v1", "instance_count": 1e400}}', "instance_count"),
        (b'{"deploy": {"version": "v1", "instance_count": ' + b"9" * 5000 + b"}}", "not valid"),
        (b'{"deploy": {"version": "v1", "instance_count": -3}}', "instance_count"),
        (b'{"deploy": {"version": "v1", "instance_count": "3"}}', "instance_count"),
        (b'{"deploy": {"version": "v1", "instance_count": 2.0}}', "instance_count"),
        (b'{"deploy": {"version": "v1", "destroy_previous": "yes"}}', "destroy_previous"),
        (b'{"deploy": {"version": "v1", "wait_for_lock": 1}}', "wait_for_lock"),
        (b"[]", "valid dictionary"),
        (b'"deploy"', "not valid"),
        (b"null", "not valid"),
        (b"", "not valid"),
        (b"\xff\xfe{", "not UTF-8"),
        ('{"deploy": {"version": "v1"}}'.encode("utf-16"), "not UTF-8"),
        (b'{"deploy": {"version": "v1\\u0000"}}', "version"),
        (b'{"deploy": {"version": "\\ud800"}}', "version"),
    ],
)
async def test_odd_json_bodies_are_a_400(hostile: Api, body: bytes, words: str) -> None:
    api = hostile
    resp = await api.client.post(
        api.url("/deploys"),
        data=body,
        headers={**api.auth, "Content-Type": "application/json"},
    )
    await refused(resp, 400, words)
    assert await api.deployster.store.list_deploys(api.service) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_a_body_that_is_not_declared_json_is_a_415(hostile: Api, content_type: str) -> None:
    api = hostile
    resp = await api.client.put(
        api.url("/policy"),
        data=b'{"policy": {}}',
        headers={**api.auth, "Content-Type": content_type},
    )
    await refused(resp, 415, "application/json")


@pytest.mark.parametrize(
    "path,status",
    [
        ("/deploys/%00", 404),
        ("/deploys/" + "a" * 200, 404),
        ("/deploys/..%2F..%2Fpolicy", 404),
        ("/deploys/%E2%80%A8", 404),
        ("/tasks/%00", 404),
        ("/tasks/" + "1" * 200 + "?follow=1", 404),
    ],
)
async def test_odd_record_ids_are_a_404_without_a_lookup(
    hostile: Api, path: str, status: int
) -> None:
    api = hostile
    resp = await api.client.get(URL(api.url(path), encoded=True), headers=api.auth)
    await refused(resp, status, "id")


@pytest.mark.parametrize(
    "name",
    ["%00", "a%2Fb", "%E2%80%A8", "-a", "caf%C3%A9", "%EF%BC%91", "%2E%2E", "%zz", "a" * 129],
)
async def test_odd_service_names_are_a_400(hostile: Api, name: str) -> None:
    api = hostile
    resp = await api.client.get(URL(f"/v1/services/{name}/deploys", encoded=True), headers=api.auth)
    await refused(resp, 400, "Service name")


@pytest.mark.parametrize(
    "authorization",
    ["Basic \u00e9\u00e9", "Basic " + "A" * 6000, "Basic ====", "Bearer x", "Basic Og=="],
)
async def test_odd_authorization_headers_are_a_401(hostile: Api, authorization: str) -> None:
    api = hostile
    resp = await api.client.get(api.url("/deploys"), headers={"Authorization": authorization})
    await refused(resp, 401)
