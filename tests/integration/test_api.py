"""The v1 API against real etcd and localfleet, with the test workload as the service."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest
from helpers import ENV_SECRET, eventually
from integration.conftest import FAST_POLICY, PASSWORD, Api, basic_auth

from deployster.config import Settings
from deployster.launchers import EtcdServer, free_port
from deployster.policy import HealthPolicy, ServicePolicy
from deployster.records import DeployRecord, DeployState
from deployster.server import Deployster
from handlers.deploys import TOO_MANY_INSTANCES, TOO_MANY_VERSIONS

UNIT_RE = r"{svc}:{ver}:\d{{4}}\.\d\d\.\d\d-\d\d\.\d\d\.\d\d@{n}\.service"


async def announcements(api: Api) -> dict[str, dict]:
    prefix = f"{api.deployster.settings.etcd_prefix}/instances/{api.service}/".encode()
    return {
        kv.key.decode(): json.loads(kv.value) for kv in await api.deployster.etcd.get_prefix(prefix)
    }


# -- version, auth, envelope ---------------------------------------------------------------


async def test_version_is_plain_text(api: Api) -> None:
    resp = await api.client.get("/v1/version", headers=api.auth)
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", await resp.text())


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/version"),
        ("POST", "/v1/services/web/deploys"),
        ("DELETE", "/v1/services/web/deploys/v1"),
        ("GET", "/v1/services/web/units"),
        ("GET", "/nowhere"),
        ("GET", "/debug/pprof/"),
        ("PATCH", "/v1/version"),
    ],
)
async def test_every_path_needs_auth(api: Api, method: str, path: str) -> None:
    resp = await api.client.request(method, path)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="Deployster"'
    assert (await resp.json())["error"] == "unauthorized"


@pytest.mark.parametrize("user,password", [("deployster", "wrong"), ("other", PASSWORD)])
async def test_wrong_credentials_are_refused(api: Api, user: str, password: str) -> None:
    resp = await api.client.get("/v1/version", headers=basic_auth(user, password))
    assert resp.status == 401
    assert (await resp.json()) == {
        "error": "unauthorized",
        "description": "The username or password is wrong.",
    }


async def test_unknown_path_and_method_use_the_envelope(api: Api) -> None:
    resp = await api.client.get("/v1/nothing", headers=api.auth)
    assert resp.status == 404
    assert await resp.json() == {"error": "not_found", "description": "GET /v1/nothing not found."}
    resp = await api.client.put("/v1/version", headers=api.auth)
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    assert (await resp.json())["error"] == "method_not_allowed"


# -- deploy input validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body,status,sentence",
    [
        ({}, 400, "The field 'deploy' is required."),
        ({"deploy": {}}, 400, "The field 'deploy.version' is required."),
        ({"deploy": {"version": "bad:tag"}}, 400, "Version 'bad:tag' is not valid"),
        ({"deploy": {"version": "v1", "timestamp": "yesterday"}}, 400, "YYYY.MM.DD-HH.MM.SS"),
        ({"deploy": {"version": "v1", "instance_count": -1}}, 400, "deploy.instance_count"),
        ({"deploy": {"version": "v1", "instance_count": 5000}}, 400, "deploy.instance_count"),
        ({"deploy": {"version": "v1", "env": {"1BAD": "x"}}}, 400, "1BAD"),
        ({"deploy": {"version": "v1", "env": {"OK": "a\nb"}}}, 400, "OK"),
        ({"deploy": "v1"}, 400, "The field 'deploy'"),
    ],
)
async def test_bad_deploy_bodies_get_a_400_sentence(
    api: Api, body: dict, status: int, sentence: str
) -> None:
    resp = await api.client.post(api.url("/deploys"), json=body, headers=api.auth)
    data = await resp.json()
    assert resp.status == status, data
    assert data["error"] == "invalid_request"
    assert sentence in data["description"]
    assert await api.units() == []


async def test_bad_service_name_is_refused_before_fleet(api: Api) -> None:
    resp = await api.client.post(
        "/v1/services/bad@name/deploys", json={"deploy": {"version": "v1"}}, headers=api.auth
    )
    assert resp.status == 400
    assert "Service name 'bad@name' is not valid" in (await resp.json())["description"]


async def test_not_json_and_wrong_content_type(api: Api) -> None:
    resp = await api.client.post(
        api.url("/deploys"), data=b"{nope", headers={**api.auth, "Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert "not valid JSON" in (await resp.json())["description"]
    resp = await api.client.post(
        api.url("/deploys"),
        data=b"version=v1",
        headers={**api.auth, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 415
    assert (await resp.json())["error"] == "unsupported_media_type"


async def test_bodies_over_one_mebibyte_get_413(api: Api) -> None:
    big = {"deploy": {"version": "v1", "padding": "x" * (1024 * 1024)}}
    resp = await api.client.post(api.url("/deploys"), json=big, headers=api.auth)
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    assert await api.units() == []


# -- deploying -----------------------------------------------------------------------------


async def test_deploy_launches_units_that_serve_http(api: Api) -> None:
    resp = await api.client.post(
        api.url("/deploys"),
        headers=api.auth,
        json={"deploy": {"version": "v1", "instance_count": 3}},
    )
    assert resp.status == 201
    deploy_json = (await resp.json())["deploy"]
    assert resp.headers["Location"] == api.url(f"/deploys/{deploy_json['id']}")
    assert deploy_json["state"] == "running"
    assert deploy_json["instance_count"] == 3
    for n, unit in enumerate(deploy_json["units"], start=1):
        assert re.fullmatch(UNIT_RE.format(svc=api.service, ver="v1", n=n), unit)

    # The record is in etcd where the architecture says.
    key = f"{api.deployster.settings.etcd_prefix}/deploys/{api.service}/{deploy_json['id']}"
    stored = DeployRecord.model_validate_json((await api.deployster.etcd.get(key.encode())).value)
    assert stored.units == deploy_json["units"]

    done = await api.finished(deploy_json["id"])
    assert done["state"] == "succeeded", done

    resp = await api.client.get(api.url("/units"), headers=api.auth)
    units = (await resp.json())["units"]
    assert sorted(u["instance"] for u in units) == ["1", "2", "3"]
    for u in units:
        assert set(u) == {
            "service",
            "instance",
            "version",
            "current_state",
            "desired_state",
            "machine_id",
            "deploy_timestamp",
        }
        assert (u["service"], u["version"], u["desired_state"]) == (api.service, "v1", "launched")
        assert u["current_state"] == "launched"
        assert u["deploy_timestamp"] == deploy_json["timestamp"]
    # X-Fleet Conflicts spread the three instances over the three machines.
    assert len({u["machine_id"] for u in units}) == 3

    found = await eventually(lambda: _count(announcements(api), 3))
    async with aiohttp.ClientSession() as http:
        for value in found.values():
            async with http.get(value["url"]) as answer:
                body = await answer.json()
            assert (body["service"], body["version"]) == (api.service, "v1")


async def _count(coro, n: int):  # type: ignore[no-untyped-def]
    found = await coro
    return found if len(found) == n else None


async def test_destroy_previous_replaces_every_old_unit(api: Api) -> None:
    first = (await api.deploy({"version": "v1", "instance_count": 2}))["deploy"]
    assert (await api.finished(first["id"]))["state"] == "succeeded"
    second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
    assert second["instance_count"] == 2  # inherited from the running release
    assert second["previous_units"] == first["units"]
    assert (await api.finished(second["id"]))["state"] == "succeeded"
    assert sorted(await api.units()) == sorted(second["units"])


async def test_the_original_400s_for_destroy_previous(api: Api) -> None:
    await api.deployed({"version": "v1", "instance_count": 2})
    resp = await api.client.post(
        api.url("/deploys"),
        headers=api.auth,
        json={"deploy": {"version": "v2", "destroy_previous": True, "instance_count": 1}},
    )
    assert resp.status == 400
    assert await resp.json() == {"error": "invalid_request", "description": TOO_MANY_INSTANCES}
    await api.deployed({"version": "v1b", "instance_count": 1})
    resp = await api.client.post(
        api.url("/deploys"),
        headers=api.auth,
        json={"deploy": {"version": "v3", "destroy_previous": True}},
    )
    assert resp.status == 400
    assert (await resp.json())["description"] == TOO_MANY_VERSIONS
    # Nothing of the refused deploys reached fleet.
    assert len(await api.units()) == 3


async def test_a_failing_unit_rolls_back_and_keeps_the_old_release(api: Api) -> None:
    old = (await api.deploy({"version": "v1", "instance_count": 2}))["deploy"]
    assert (await api.finished(old["id"]))["state"] == "succeeded"
    # An unparsable startup delay makes the workload exit non-zero: systemd reports failed.
    bad = (
        await api.deploy(
            {
                "version": "v2",
                "destroy_previous": True,
                "env": {"DEPLOYSTER_WORKLOAD_STARTUP_DELAY": "soon"},
            }
        )
    )["deploy"]
    done = await api.finished(bad["id"])
    assert done["state"] == "rolled_back"
    assert "failed" in done["error"] and api.service in done["error"]
    # The reason is in the error and the events, though the failed units are destroyed.
    assert "its last log lines:" in done["error"]
    assert "DEPLOYSTER_WORKLOAD_STARTUP_DELAY" in done["error"]
    assert "Main process exited, code=exited, status=2" in done["error"]
    assert [e["message"] for e in done["events"] if e["kind"] == "rolling_back"] == [done["error"]]
    assert sorted(await api.units()) == sorted(old["units"])


async def test_env_reaches_units_but_not_the_api(api: Api) -> None:
    created = (await api.deploy({"version": "v1", "env": {"GREETING": '100% "hi"'}}))["deploy"]
    assert created["env"] == ["GREETING"]
    assert "100%" not in json.dumps(await api.record(created["id"]))
    unit = await api.fleet.get_unit(created["units"][0])
    env_lines = [o.value for o in unit.options if o.name == "Environment"]
    assert any("GREETING=100%%" in line for line in env_lines), env_lines


async def test_a_second_deploy_while_one_runs_gets_409_naming_the_holder(api: Api) -> None:
    # A health check that never passes keeps the first deploy running until its deadline.
    await api.deployster.store.save_policy(
        api.service, ServicePolicy(health=HealthPolicy(path="/nowhere"))
    )
    first = (await api.deploy({"version": "v1"}))["deploy"]
    resp = await api.client.post(
        api.url("/deploys"), headers=api.auth, json={"deploy": {"version": "v2"}}
    )
    assert resp.status == 409
    body = await resp.json()
    assert body["error"] == "conflict" and first["id"] in body["description"]
    assert await api.units() == first["units"]


async def test_explicit_timestamp_is_used(api: Api) -> None:
    created = (await api.deploy({"version": "v1", "timestamp": "2015.03.02-00.31.45"}))["deploy"]
    assert created["units"] == [f"{api.service}:v1:2015.03.02-00.31.45@1.service"]


async def test_deploy_history_newest_first_and_unknown_id(api: Api) -> None:
    a = await api.deployed({"version": "v1"})
    b = await api.deployed({"version": "v2"})
    resp = await api.client.get(api.url("/deploys"), headers=api.auth)
    assert [d["id"] for d in (await resp.json())["deploys"]] == [b["id"], a["id"]]
    resp = await api.client.get(api.url("/deploys/nope"), headers=api.auth)
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"


# -- destroying and listing ----------------------------------------------------------------


async def test_destroy_a_version_and_one_timestamp(api: Api) -> None:
    a = await api.deployed({"version": "v1", "timestamp": "2015.03.02-00.31.45"})
    b = await api.deployed({"version": "v1", "timestamp": "2015.03.03-00.31.45"})
    c = await api.deployed({"version": "v2"})
    resp = await api.client.delete(
        api.url("/deploys/v1?timestamp=2015.03.02-00.31.45"), headers=api.auth
    )
    assert resp.status == 204
    assert sorted(await api.units()) == sorted(b["units"] + c["units"])
    resp = await api.client.delete(api.url("/deploys/v1"), headers=api.auth)
    assert resp.status == 204
    assert await api.units() == c["units"]
    resp = await api.client.delete(api.url("/deploys/v1"), headers=api.auth)
    assert resp.status == 404
    assert "no units of version 'v1'" in (await resp.json())["description"]
    resp = await api.client.delete(api.url("/deploys/v2?timestamp=later"), headers=api.auth)
    assert resp.status == 400
    assert a["units"][0] not in await api.units()


async def test_units_of_an_unknown_service_is_an_empty_list(api: Api) -> None:
    resp = await api.client.get(api.url("/units"), headers=api.auth)
    assert resp.status == 200
    body = await resp.json()
    assert body["units"] == []
    assert 0 <= body["age"] < 5  # the first request read fleet: the view is fresh


# -- fleet unreachable, restart ------------------------------------------------------------


async def test_fleet_unreachable_is_a_502_that_names_fleet(
    aiohttp_client, etcd_endpoint: str
) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        etcd=etcd_endpoint,
        etcd_prefix="/deployster-nofleet",
        fleet_endpoint=f"http://127.0.0.1:{free_port()}",
        template="workload",
        password=PASSWORD,
    )
    deployster = await Deployster.connect(settings)
    try:
        client = await aiohttp_client(deployster.app)
        auth = basic_auth("deployster", PASSWORD)
        resp = await client.get("/v1/services/web/units", headers=auth)
        assert resp.status == 502
        body = await resp.json()
        assert body["error"] == "bad_gateway" and "fleet" in body["description"]
        resp = await client.post(
            "/v1/services/web/deploys", json={"deploy": {"version": "v1"}}, headers=auth
        )
        assert resp.status == 502
        assert "fleet" in (await resp.json())["description"]
        assert await deployster.store.list_deploys("web") == []
    finally:
        await deployster.close()


async def test_an_unfinished_deploy_is_resumed_after_a_restart(api: Api) -> None:
    # A record as a server killed right after writing it leaves behind: pending, nothing in fleet.
    pending = DeployRecord(
        id="20261126-000000-abcdef",
        service=api.service,
        version="v9",
        timestamp="2026.11.26-00.00.00",
        instance_count=2,
        destroy_previous=False,
        units=[f"{api.service}:v9:2026.11.26-00.00.00@{n}.service" for n in (1, 2)],
        policy=FAST_POLICY,
    )
    await api.deployster.store.save_deploy(pending)
    assert await api.deployster.deploys.resume() == 1
    done = await api.finished(pending.id)
    assert done["state"] == DeployState.SUCCEEDED
    assert sorted(await api.units()) == pending.units


async def test_every_log_line_of_a_deploy_names_service_and_deploy(
    api: Api, log_lines: list[dict]
) -> None:
    old = await api.deployed({"version": "v1", "instance_count": 2})
    new = await api.deployed(
        {"version": "v2", "destroy_previous": True, "env": {"SECRET_TOKEN": ENV_SECRET}}
    )
    deploy_lines = [
        line
        for line in log_lines
        if line["event"]
        in {
            "deploy_planned",
            "units_submitted",
            "release_healthy",
            "previous_units_destroyed",
            "deploy_finished",
        }
    ]
    assert {line["event"] for line in deploy_lines} == {
        "deploy_planned",
        "units_submitted",
        "release_healthy",
        "previous_units_destroyed",
        "deploy_finished",
    }
    for line in deploy_lines:
        assert line["service"] == api.service
        assert line["deploy_id"] in (old["id"], new["id"])
    assert ENV_SECRET not in repr(log_lines)


async def test_etcd_down_is_a_503_and_nothing_reaches_fleet(
    aiohttp_client, private_etcd: EtcdServer, localfleet: str
) -> None:  # type: ignore[no-untyped-def]
    etcd = private_etcd
    settings = Settings(
        etcd=etcd.endpoint, fleet_endpoint=localfleet, template="workload", password=PASSWORD
    )
    deployster = await Deployster.connect(settings)
    try:
        client = await aiohttp_client(deployster.app)
        auth = basic_auth("deployster", PASSWORD)
        etcd.stop()
        resp = await client.post(
            "/v1/services/etcd-down/deploys", json={"deploy": {"version": "v1"}}, headers=auth
        )
        assert resp.status == 503
        body = await resp.json()
        assert body["error"] == "unavailable" and "etcd" in body["description"]
        assert [
            u for u in await deployster.fleet.list_units() if u.name.startswith("etcd-down:")
        ] == []
        resp = await client.get("/v1/services/etcd-down/deploys", headers=auth)
        assert resp.status == 503
    finally:
        await deployster.close()


async def test_rollback_redeploys_the_previous_release(api: Api) -> None:
    resp = await api.client.post(api.url("/rollback"), headers=api.auth)
    assert resp.status == 409
    assert "no earlier successful release" in (await resp.json())["description"]
    v1 = await api.deployed({"version": "v1", "instance_count": 2, "env": {"COLOR": "blue"}})
    v2 = await api.deployed({"version": "v2", "destroy_previous": True})
    assert v2["state"] == "succeeded"
    resp = await api.client.post(api.url("/rollback"), headers=api.auth)
    assert resp.status == 201
    back = (await resp.json())["deploy"]
    assert (back["version"], back["source"], back["instance_count"], back["env"]) == (
        "v1",
        "rollback",
        2,
        ["COLOR"],
    )
    assert back["timestamp"] != v1["timestamp"]
    assert (await api.finished(back["id"]))["state"] == "succeeded"
    assert sorted(await api.units()) == sorted(back["units"])


async def test_services_list_the_live_release_and_instance_health(api: Api) -> None:
    v1 = await api.deployed({"version": "v1", "instance_count": 2})
    failing = await api.deploy(
        {"version": "v2", "destroy_previous": True, "env": {"DEPLOYSTER_WORKLOAD_HEALTH": "fail"}}
    )

    async def listed() -> dict | None:
        resp = await api.client.get("/v1/services", headers=api.auth)
        assert resp.status == 200
        mine = [s for s in (await resp.json())["services"] if s["name"] == api.service]
        # Wait until the failing release's instances have been probed at least once.
        if mine and any(i["last_probe"] == "HTTP 503" for i in mine[0]["instances"]):
            return mine[0]
        return None

    service = await eventually(listed, timeout=20)
    assert service["live"] == {"version": "v1", "timestamp": v1["timestamp"], "deploy_id": v1["id"]}
    assert service["latest_deploy"]["id"] == failing["deploy"]["id"]
    healthy = [i for i in service["instances"] if i["healthy"]]
    assert sorted(i["unit"] for i in healthy) == sorted(v1["units"])
    assert all(i["routed"] for i in healthy)


async def test_repeated_slashes_redirect_to_the_route_keeping_method_and_body(api: Api) -> None:
    """A client URL with a trailing slash sends //v1/...; it reaches the route, as with the
    2015 server, instead of a 404 that its client showed as an empty table."""
    root = str(api.client.make_url("/")).rstrip("/")  # a real client's URL with a slash too
    session = api.client.session
    units = f"{root}//v1/services/{api.service}/units"
    async with session.get(units, headers=api.auth, allow_redirects=False) as resp:
        assert resp.status == 308
        assert resp.headers["Location"] == f"/v1/services/{api.service}/units"
    async with session.get(units, headers=api.auth) as resp:
        assert resp.status == 200 and (await resp.json())["units"] == []
    async with session.post(
        f"{root}//v1/services/{api.service}//deploys",
        json={"deploy": {"version": "v1", "instance_count": 1}},
        headers=api.auth,
    ) as resp:
        assert resp.status == 201, await resp.text()
        created = await resp.json()
    await api.finished(created["deploy"]["id"])
    # A path that resolves nowhere stays a 404 in the envelope, after auth.
    async with session.get(f"{root}//v1//nothing", headers=api.auth) as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
