"""The deploy events stream, `deployctl deploy --wait`, and deploys queued behind the lock."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from typing import Any

from integration.conftest import FAST_POLICY, PASSWORD, Api

from deployster.ctl import SseParser
from deployster.policy import ServicePolicy

FAILING = {"DEPLOYSTER_WORKLOAD_HEALTH": "fail"}
# A failing instance is given up on after 2 s instead of 20.
QUICK_ROLLBACK = FAST_POLICY.model_copy(update={"instance_deadline": 2.0})


async def read_events(
    api: Api, deploy_id: str, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    """Every event the stream sends until the server ends it."""
    headers = dict(api.auth)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    resp = await api.client.get(api.url(f"/deploys/{deploy_id}/events"), headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    parser, events = SseParser(), []
    async for line in resp.content:
        event = parser.feed(line.decode())
        if event is not None:
            data = json.loads(event["data"])
            assert event["id"] == str(data["seq"]) and event["event"] == data["kind"]
            events.append(data)
    return events


async def test_the_stream_follows_a_deploy_live_and_replays_it_afterwards(api: Api) -> None:
    deploy_id = (await api.deploy({"version": "v1", "instance_count": 2}))["deploy"]["id"]
    live = await read_events(api, deploy_id)  # opened while the deploy runs
    kinds = [e["kind"] for e in live]
    assert kinds == [
        "planned",
        "submitted",
        "instance_ready",
        "instance_ready",
        "routed",
        "succeeded",
    ], kinds
    assert [e["seq"] for e in live] == list(range(1, len(live) + 1))
    assert {e["unit"] for e in live if e["kind"] == "instance_ready"} == set(await api.units())
    assert live[-1]["message"] == "v1 is live with 2 instance(s)"

    assert await read_events(api, deploy_id) == live  # replayed from the start once it ended
    assert await read_events(api, deploy_id, last_event_id="4") == live[4:]
    record = await api.record(deploy_id)
    assert [e["kind"] for e in record["events"]] == kinds


async def test_with_a_min_healthy_time_each_instance_shows_healthy_then_ready(api: Api) -> None:
    await api.deployster.store.save_policy(
        api.service, FAST_POLICY.model_copy(update={"min_healthy_time": 1.0})
    )
    deploy_id = (await api.deploy({"version": "v1", "instance_count": 2}))["deploy"]["id"]
    events = await read_events(api, deploy_id)
    for unit in await api.units():
        kinds = [e["kind"] for e in events if e["unit"] == unit]
        assert kinds == ["instance_healthy", "instance_ready"], events
        healthy, ready = (e for e in events if e["unit"] == unit)
        assert "ready once healthy for 1 s" in healthy["message"]
        gap = datetime.fromisoformat(ready["at"]) - datetime.fromisoformat(healthy["at"])
        assert gap.total_seconds() >= 0.9


async def test_a_rolled_back_deploy_streams_its_reason(api: Api) -> None:
    await api.deployed({"version": "v1"})
    await api.deployster.store.save_policy(api.service, QUICK_ROLLBACK)
    deploy_id = (await api.deploy({"version": "v2", "destroy_previous": True, "env": FAILING}))[
        "deploy"
    ]["id"]
    events = await read_events(api, deploy_id)
    assert [e["kind"] for e in events][-2:] == ["rolling_back", "rolled_back"]
    assert "was not healthy within its deadline of 2 s" in events[-1]["message"]
    assert "; last probe: " in events[-1]["message"]


async def test_stream_errors_are_envelopes(api: Api) -> None:
    resp = await api.client.get(api.url("/deploys/nope/events"), headers=api.auth)
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    deploy_id = (await api.deployed({"version": "v1"}))["id"]
    resp = await api.client.get(
        api.url(f"/deploys/{deploy_id}/events"), headers={**api.auth, "Last-Event-ID": "abc"}
    )
    assert resp.status == 400
    assert "Last-Event-ID" in (await resp.json())["description"]


async def deployctl(api: Api, *args: str) -> tuple[int, str, str]:
    """Run deployctl as a user would, against the test server."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "deployster.ctl",
        "--url",
        str(api.client.make_url("")),
        "--password",
        PASSWORD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DEPLOYSTER_PASSWORD": ""},
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_deployctl_wait_exits_by_outcome(api: Api) -> None:
    code, out, err = await deployctl(api, "deploy", api.service, "v1", "--instances", "2", "--wait")
    assert code == 0, (out, err)
    assert "Deploy triggered!" in out
    assert "] instance_ready: " in out and "] succeeded: v1 is live with 2 instance(s)" in out
    assert out.rstrip().endswith("succeeded.")

    await api.deployster.store.save_policy(api.service, QUICK_ROLLBACK)
    code, out, err = await deployctl(
        api, "deploy", api.service, "v2", "--env", "DEPLOYSTER_WORKLOAD_HEALTH=fail", "--wait"
    )
    assert code == 3, (out, err)
    assert "] rolled_back: instance " in out and out.rstrip().endswith("rolled back.")
    assert len(await api.units()) == 2  # v1 still there

    slow = FAST_POLICY.model_copy(update={"min_healthy_time": 30.0})
    await api.deployster.store.save_policy(api.service, slow)
    code, out, err = await deployctl(api, "deploy", api.service, "v3", "--wait", "--timeout", "1")
    assert code == 4, (out, err)
    assert "Stopped waiting after 1 s" in err


async def test_deployctl_releases_and_status(api: Api) -> None:
    first = await api.deployed({"version": "v1", "instance_count": 2})
    second = await api.deployed({"version": "v2", "destroy_previous": True})
    code, out, _ = await deployctl(api, "releases", api.service)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["Deploy", "Version", "State"]
    assert lines[1].split()[:4] == ["*", second["id"], "v2", "succeeded"]
    assert lines[2].split()[:3] == [first["id"], "v1", "succeeded"]

    code, out, _ = await deployctl(api, "status", api.service)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(api.service))
    assert row.split()[1] == "v2" and row.split()[-1] == "2/2", out
    assert out.count("http://127.0.0.1:") == 2
    for command in ("status", "releases"):
        code, out, err = await deployctl(api, command, "no-such-service")
        assert code == 1 and "no deploy of service 'no-such-service'" in err, command
        assert out == "", command


async def test_a_deploy_that_asks_to_wait_is_queued_and_planned_when_its_turn_comes(
    api: Api,
) -> None:
    await api.deployed({"version": "v1", "instance_count": 2})
    holding = FAST_POLICY.model_copy(update={"min_healthy_time": 1.5})
    await api.deployster.store.save_policy(api.service, holding)
    running = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]
    refused = await api.deploy({"version": "v3", "destroy_previous": True}, expect=409)
    assert running["id"] in refused["description"]

    queued = (
        await api.deploy(
            {"version": "v3", "destroy_previous": True, "wait_for_lock": True}, expect=202
        )
    )["deploy"]
    assert queued["state"] == "pending" and queued["step"] == "queued"
    assert queued["units"] == []

    first, second = await api.finished(running["id"]), await api.finished(queued["id"], timeout=40)
    assert first["state"] == "succeeded" and second["state"] == "succeeded", (first, second)
    # Planned when its turn came: it replaced v2's units, which did not exist when it queued.
    assert sorted(second["previous_units"]) == sorted(first["units"])
    assert [e["kind"] for e in second["events"]][:2] == ["queued", "planned"]
    assert {u.split(":")[1] for u in await api.units()} == {"v3"}


async def test_a_queued_deploy_gives_up_at_its_deadline(api: Api) -> None:
    await api.deployster.store.save_policy(
        api.service,
        FAST_POLICY.model_copy(update={"min_healthy_time": 30.0, "deploy_deadline": 40.0}),
    )
    running = (await api.deploy({"version": "v1"}))["deploy"]
    await api.deployster.store.save_policy(api.service, ServicePolicy(deploy_deadline=1.0))
    queued = (await api.deploy({"version": "v2", "wait_for_lock": True}, expect=202))["deploy"]
    ended = await api.finished(queued["id"], timeout=10)
    assert ended["state"] == "failed"
    assert ended["error"] == "the service's lock was not free within the deploy deadline of 1 s"
    assert (await api.record(running["id"]))["state"] == "running"  # untouched
