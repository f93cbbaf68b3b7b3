"""A server that lost its deploy's lock stops before its next step, and resumes only once
the lock is free again."""

from __future__ import annotations

import asyncio
from typing import Any

from faults.conftest import assert_settled
from helpers import eventually
from integration.conftest import FAST_POLICY, Api

from deployster.etcd import EtcdError
from deployster.events import DeploySucceeded
from deployster.records import DeployRecord, LockHolder


async def test_a_lost_lock_stops_the_worker_before_the_switch(fault_api: Api) -> None:
    api = fault_api
    store = api.deployster.store
    await store.save_policy(api.service, FAST_POLICY.model_copy(update={"min_healthy_time": 1.5}))
    first = await api.deployed({"version": "v1", "instance_count": 2})
    assert first["state"] == "succeeded", first
    second = (await api.deploy({"version": "v2", "destroy_previous": True}))["deploy"]

    # Someone else holds the lock now (as after this server's lease expired and a peer took
    # it): the key is replaced under a lease that is not the worker's.
    lease = await api.deployster.etcd.lease(30)
    key = store.locks._key(api.service)
    await api.deployster.etcd.put(
        key,
        LockHolder(holder="peer-deploy", lease=lease.id).model_dump_json().encode(),
        lease=lease.id,
    )
    await asyncio.sleep(4)  # well past min_healthy_time: the switch would have happened
    held = await api.record(second["id"])
    assert held["state"] == "running", held
    assert "retiring" not in [e["kind"] for e in held["events"]], held
    assert set(first["units"]) <= set(await api.units())  # the live release is untouched

    # The peer's lease goes: the worker takes the lock and finishes the deploy.
    await api.deployster.etcd.revoke_lease(lease.id)
    done = await api.finished(second["id"], timeout=30)
    assert done["state"] == "succeeded", done
    assert "resumed" in [e["kind"] for e in done["events"]]
    await assert_settled(api, done, done["units"])


async def test_a_deploy_whose_lock_lapsed_still_blocks_a_second_one(fault_api: Api) -> None:
    """The lock's lease expired (etcd was away) and the worker has not taken it again yet:
    a new deploy is still refused, and the first one finishes."""
    api = fault_api
    store = api.deployster.store
    await store.save_policy(api.service, FAST_POLICY.model_copy(update={"min_healthy_time": 2}))
    running = (await api.deploy({"version": "v1", "instance_count": 1}))["deploy"]
    await api.deployster.etcd.delete(store.locks._key(api.service))  # as a lapsed lease does
    refused = await api.deploy({"version": "v2"}, expect=409)
    assert running["id"] in refused["description"], refused
    done = await api.finished(running["id"], timeout=30)
    assert done["state"] == "succeeded", done
    assert [r.version for r in await store.list_deploys(api.service)] == ["v1"]
    await assert_settled(api, done, done["units"])


async def test_a_finish_whose_answer_etcd_lost_still_frees_the_lock(
    fault_api: Api, monkeypatch: Any
) -> None:
    """etcd wrote the finished record, but its answer never came (the request's deadline
    passed first): the worker, retrying, finds the record finished, and still lets go of the
    lock and tells the bus how the deploy ended."""
    api = fault_api
    store = api.deployster.store
    saving = store.save_deploy
    lost: list[str] = []
    ended: list[DeploySucceeded] = []

    async def on_succeeded(event: DeploySucceeded) -> None:
        ended.append(event)

    async def told() -> bool:
        return bool(ended)

    api.deployster.bus.subscribe(DeploySucceeded, on_succeeded)

    async def written_but_unanswered(record: DeployRecord) -> DeployRecord:
        saved = await saving(record)
        if record.state.finished and not lost:
            lost.append(record.id)
            raise EtcdError("etcd did not answer: Deadline Exceeded")
        return saved

    monkeypatch.setattr(store, "save_deploy", written_but_unanswered)
    done = await api.deployed({"version": "v1"})
    assert lost == [done["id"]] and done["state"] == "succeeded", done
    await assert_settled(api, done, done["units"])
    await eventually(told, timeout=5)
    assert [e.deploy_id for e in ended] == [done["id"]]
