"""Validation before side effects, through the real API with real etcd and localfleet: what can
be refused is a 400 naming the field before the service's lock is taken; a deploy that fails
between the lock and fleet releases the lock and ends ``failed``; a resumed record that cannot
be submitted ends ``failed`` instead of staying ``pending``."""

from __future__ import annotations

import pytest
from helpers import eventually
from integration.conftest import FAST_POLICY, Api

from deployster.events import DeployFailed, DeployRequested
from deployster.naming import MAX_UNIT_NAME
from deployster.records import DeployRecord, DeployState


async def lock_holder(api: Api) -> object:
    return await api.deployster.store.locks.holder(api.service)


async def assert_lock_free_and_deploy_works(api: Api) -> None:
    assert await lock_holder(api) is None
    done = await api.deployed({"version": "v1"})
    assert done["state"] == DeployState.SUCCEEDED, done


async def test_a_unit_name_past_the_limit_is_a_400_and_takes_no_lock(api: Api) -> None:
    # 120 + 128 characters pass each part's rule; the unit name would not fit fleet's limit.
    long_service = api.service + "-" + "s" * (120 - len(api.service) - 1)
    resp = await api.client.post(
        f"/v1/services/{long_service}/deploys",
        json={"deploy": {"version": "v" * 128}},
        headers=api.auth,
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"] == "invalid_request"
    assert str(MAX_UNIT_NAME) in body["description"] and "deploy.version" in body["description"]
    assert await api.deployster.store.locks.holder(long_service) is None
    assert await api.deployster.store.list_deploys(long_service) == []
    # The longest version that fits is accepted, and the service deploys.
    fitting = MAX_UNIT_NAME - len(f"{long_service}::2026.01.01-00.00.00@100.service")
    resp = await api.client.post(
        f"/v1/services/{long_service}/deploys",
        json={"deploy": {"version": "v" * fitting, "timestamp": "2026.01.01-00.00.00"}},
        headers=api.auth,
    )
    body = await resp.json()
    assert resp.status == 201, body
    assert len(body["deploy"]["units"][0]) <= MAX_UNIT_NAME

    async def ended() -> bool:
        record = await api.deployster.store.get_deploy(long_service, body["deploy"]["id"])
        return record is not None and record.state.finished

    await eventually(ended, timeout=30)
    await api.client.delete(
        f"/v1/services/{long_service}/deploys/{'v' * fitting}", headers=api.auth
    )


@pytest.mark.parametrize(
    "timestamp",
    [
        "\uff12\uff10\uff12\uff16.01.01-00.00.00",  # full-width digits match \d
        "2026.01.01-00.00.0\u0663",  # an Arabic-Indic digit
        "2026.02.30-00.00.00",  # no such day
        "2026.01.01-24.00.00",
        "2026.1.01-00.00.00",
    ],
)
async def test_a_timestamp_that_is_not_ascii_digits_or_no_real_date_is_a_400(
    api: Api, timestamp: str
) -> None:
    resp = await api.client.post(
        api.url("/deploys"),
        json={"deploy": {"version": "v1", "timestamp": timestamp}},
        headers=api.auth,
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert "deploy.timestamp" in body["description"]
    assert await api.deployster.store.list_deploys(api.service) == []
    await assert_lock_free_and_deploy_works(api)


async def test_a_failure_between_lock_and_fleet_releases_the_lock_and_fails_the_record(
    api: Api,
) -> None:
    # The route's checks cannot see a policy written straight into etcd that asks for more
    # instances than a unit name can number: planning fails after the lock was taken.
    long_service = api.service + "-" + "s" * (120 - len(api.service) - 1)
    fitting = MAX_UNIT_NAME - len(f"{long_service}::2026.01.01-00.00.00@100.service")
    policy = FAST_POLICY.model_copy(update={"instance_count": 100})
    await api.deployster.store.save_policy(long_service, policy)
    broken = DeployRecord(
        id="20260101-000000-bad001",
        service=long_service,
        version="v" * (fitting + 1),
        timestamp="2026.01.01-00.00.00",
        instance_count=0,
        destroy_previous=False,
        policy=FAST_POLICY,
    )
    # Straight onto the bus: as a webhook or rollback would, past the route's checks.
    event = DeployRequested(
        service=long_service,
        deploy_id=broken.id,
        version=broken.version,
        timestamp=broken.timestamp,
    )
    result = await api.deployster.bus.request(
        event, until=lambda e: isinstance(e, DeployFailed) and e.deploy_id == broken.id, timeout=10
    )
    assert isinstance(result, DeployFailed)
    assert str(MAX_UNIT_NAME) in result.reason  # the caller learns why
    assert await api.deployster.store.locks.holder(long_service) is None
    # Nothing half-done: no record left pending (none was written, or it ended failed), no
    # unit in fleet, and the next deploy of the service starts.
    record = await api.deployster.store.get_deploy(long_service, broken.id)
    assert record is None or record.state is DeployState.FAILED
    assert await api.units(long_service) == []
    await api.deployster.store.save_policy(long_service, FAST_POLICY)
    resp = await api.client.post(
        f"/v1/services/{long_service}/deploys",
        json={"deploy": {"version": "v1", "instance_count": 1}},
        headers=api.auth,
    )
    assert resp.status == 201, await resp.text()
    started = (await resp.json())["deploy"]

    async def ended() -> DeployRecord | None:
        found = await api.deployster.store.get_deploy(long_service, started["id"])
        return found if found and found.state.finished else None

    assert (await eventually(ended, timeout=30)).state is DeployState.SUCCEEDED
    for unit in await api.units(long_service):
        await api.fleet.destroy_unit(unit)


async def test_a_resumed_record_that_cannot_be_submitted_ends_failed(api: Api) -> None:
    # A record as an older server left it: pending, with a timestamp in full-width digits.
    stamp = "\uff12\uff10\uff12\uff16.11.26-00.00.00"
    pending = DeployRecord(
        id="20261126-000000-fullwd",
        service=api.service,
        version="v9",
        timestamp=stamp,
        instance_count=1,
        destroy_previous=False,
        units=[f"{api.service}:v9:{stamp}@1.service"],
        policy=FAST_POLICY,
    )
    await api.deployster.store.save_deploy(pending)
    assert await api.deployster.deploys.resume() == 1

    async def ended() -> DeployRecord | None:
        record = await api.deployster.store.get_deploy(api.service, pending.id)
        return record if record and record.state.finished else None

    record = await eventually(ended)
    assert record.state is DeployState.FAILED and record.error
    assert await api.units() == []
    # Nothing is left to resume at the next start, and the service deploys.
    assert await api.deployster.deploys.resume() == 0
    await assert_lock_free_and_deploy_works(api)
