"""The index of unfinished deploys on a real etcd: written with every record in one
transaction, read instead of the records by a start, the periodic resync and the reaper, and
built once over records an older version wrote."""

from __future__ import annotations

import contextlib
import secrets
from datetime import timedelta

import aetcd
import pytest
from helpers import eventually
from integration.conftest import running_api

from deployster import etcd, keys
from deployster.etcd import EtcdError, key_pages
from deployster.events import now
from deployster.launchers import EtcdServer
from deployster.policy import ServicePolicy
from deployster.records import DeployRecord, DeployState, DeployStep, new_deploy_id
from deployster.store import Store


def a_record(
    service: str, state: DeployState = DeployState.PENDING, **fields: object
) -> DeployRecord:
    return DeployRecord(
        id=new_deploy_id(),
        service=service,
        version="v1",
        timestamp="2026.01.01-00.00.00",
        instance_count=1,
        destroy_previous=False,
        state=state,
        **fields,  # type: ignore[arg-type]
    )


async def indexed(store: Store) -> set[tuple[str, str]]:
    """(service, deploy id) of every key in the index, read straight from etcd."""
    found = set()
    async for page in key_pages(store.etcd, keys.unfinished_prefix(store.prefix).encode()):
        for key, _ in page:
            parsed = keys.parse_unfinished_key(store.prefix, key.decode())
            assert parsed is not None, key
            found.add(parsed)
    return found


async def put_unindexed(client: aetcd.Client, prefix: str, record: DeployRecord) -> None:
    """A record as a version without the index wrote it: its key alone."""
    await client.put(
        keys.deploy_key(prefix, record.service, record.id).encode(),
        record.model_dump_json().encode(),
    )


@pytest.fixture
def store(etcd_client: aetcd.Client) -> Store:
    return Store(etcd_client, f"/deployster-test-{secrets.token_hex(4)}")


async def test_the_index_follows_every_transition(store: Store) -> None:
    created = await store.save_deploy(a_record("svc"))
    assert await indexed(store) == {("svc", created.id)}

    queued = await store.save_deploy(a_record("svc", step=DeployStep.QUEUED))
    assert await indexed(store) == {("svc", created.id), ("svc", queued.id)}

    # Taken from a push: the queued deploy and its entry come with the push's removal.
    assert await store.queue_push("web", '{"tag": "v2"}', None)
    slot = await store.queued_push("web")
    assert slot is not None
    pushed = a_record("web", step=DeployStep.QUEUED)
    assert await store.take_queued_push(slot, pushed)
    assert ("web", pushed.id) in await indexed(store)
    assert await store.queued_push("web") is None

    created.state, created.step = DeployState.SUCCEEDED, DeployStep.DONE
    await store.save_deploy(created)
    queued.state, queued.step = DeployState.ROLLED_BACK, DeployStep.DONE
    await store.save_deploy(queued)
    assert await indexed(store) == {("web", pushed.id)}
    assert await store.unfinished_deploys() == {"web": [pushed.id]}

    # Deleted (as pruning does): record and entry go together, unfinished or not.
    await store.delete_deploys([pushed, created])
    assert await indexed(store) == set()
    assert await store.get_deploy("web", pushed.id) is None
    assert [r.id for r in await store.list_deploys()] == [queued.id]


async def test_more_records_than_one_transaction_holds_are_deleted(store: Store) -> None:
    """etcd allows 128 operations in a transaction: 130 records are two of them and more."""
    records = [await store.save_deploy(a_record(f"svc-{n % 3}")) for n in range(130)]
    assert len(await indexed(store)) == 130
    await store.delete_deploys(records)
    assert await indexed(store) == set()
    assert await store.list_deploys() == []
    assert await store.deploy_counts() == {}


async def test_garbage_in_the_index_is_ignored_and_logged_once(
    store: Store, etcd_client: aetcd.Client, log_lines: list[dict[str, object]]
) -> None:
    real = await store.save_deploy(a_record("svc"))
    base = keys.unfinished_prefix(store.prefix)
    garbage = [f"{base}no-id", f"{base}svc/a/b", f"{base}-bad-/x", f"{base}svc/", f"{base}\xe9/x"]
    for key in garbage:
        await etcd_client.put(key.encode(), b"\xff{not json")
    for _ in range(2):  # the resync reads the index again: the garbage is not logged again
        assert await store.unfinished_deploys() == {"svc": [real.id]}
    logged = [line["key"] for line in log_lines if line["event"] == "deploy_index_key_unreadable"]
    assert sorted(logged) == sorted(garbage)  # type: ignore[type-var]


async def test_an_entry_whose_record_is_finished_gone_or_unreadable_is_dropped(
    store: Store, etcd_client: aetcd.Client
) -> None:
    """Written by hand or by an older version: no server would ever drive these."""
    live = await store.save_deploy(a_record("svc"))
    finished = a_record("svc", DeployState.FAILED)
    await put_unindexed(etcd_client, store.prefix, finished)
    unreadable = new_deploy_id()
    await etcd_client.put(keys.deploy_key(store.prefix, "svc", unreadable).encode(), b"{oops")
    for deploy_id in (finished.id, unreadable, "20260101-000000-gone00"):
        await etcd_client.put(keys.unfinished_key(store.prefix, "svc", deploy_id).encode(), b"")
    assert await store.unfinished_deploys() == {"svc": [live.id]}
    assert await indexed(store) == {("svc", live.id)}


async def test_an_old_prefix_is_indexed_once(store: Store, etcd_client: aetcd.Client) -> None:
    old = [
        a_record("a"),
        a_record("b", DeployState.SUCCEEDED),
        a_record("c", step=DeployStep.QUEUED),
    ]
    for record in old:
        await put_unindexed(etcd_client, store.prefix, record)
    await etcd_client.put(keys.deploy_key(store.prefix, "a", "garbage").encode(), b"\xff")
    assert await store.unfinished_deploys() == {}  # no index yet: nothing found

    assert await store.index_unfinished() == 2
    assert await store.unfinished_deploys() == {"a": [old[0].id], "c": [old[2].id]}
    assert await etcd_client.get(keys.unfinished_marker(store.prefix).encode()) is not None

    # Never again: a record written without its entry after the build stays unseen.
    await put_unindexed(etcd_client, store.prefix, a_record("d"))
    assert await store.index_unfinished() == 0
    assert "d" not in await store.unfinished_deploys()


async def test_the_build_leaves_out_a_record_that_changed_after_its_read(
    etcd_endpoint: str, etcd_client: aetcd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that keeps the index finishes the deploy between the build's read and its
    write: the build writes the entry only if the record is still as it read it."""
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    record = a_record("svc")
    await put_unindexed(etcd_client, prefix, record)
    async with etcd.client(etcd_endpoint) as own:
        write_entry = own.transaction

        async def peer_finishes_first(*args: object, **kwargs: object) -> object:
            record.state = DeployState.SUCCEEDED
            await Store(etcd_client, prefix).save_deploy(record)
            return await write_entry(*args, **kwargs)

        monkeypatch.setattr(own, "transaction", peer_finishes_first)
        store = Store(own, prefix)
        assert await store.index_unfinished() == 0
        assert await indexed(store) == set()


async def test_deploy_counts_come_from_the_keys(store: Store, etcd_client: aetcd.Client) -> None:
    for service, n in (("a", 3), ("b", 1)):
        for _ in range(n):
            await store.save_deploy(a_record(service, DeployState.SUCCEEDED))
    # An undecodable value is counted (its key is a record's); a key outside the layout is not.
    await etcd_client.put(keys.deploy_key(store.prefix, "b", "garbage").encode(), b"\xff")
    await etcd_client.put(f"{store.prefix}/deploys/no-id".encode(), b"")
    assert await store.deploy_counts() == {"a": 3, "b": 2}


async def test_key_reads_fail_as_etcd_errors_while_etcd_is_down(
    private_etcd: EtcdServer,
) -> None:
    async with etcd.client(private_etcd.endpoint, timeout=1) as client:
        store = Store(client, "/deployster-down")
        await store.save_deploy(a_record("svc"))
        private_etcd.stop()
        try:
            for read in (store.unfinished_deploys, store.deploy_counts, store.index_unfinished):
                with pytest.raises(EtcdError):
                    await read()
        finally:
            private_etcd.start()
            private_etcd.wait_ready()

    async def recovered() -> dict[str, list[str]] | None:
        # The client's channel reconnects within its backoff (at most 2 s) once etcd is back.
        with contextlib.suppress(EtcdError):
            return await store.unfinished_deploys()
        return None

    assert list(await eventually(recovered)) == ["svc"]


async def test_a_start_indexes_an_old_prefix_and_finds_its_unfinished_deploy(
    aiohttp_client, etcd_endpoint: str, localfleet: str, etcd_client: aetcd.Client
) -> None:  # type: ignore[no-untyped-def]
    """An older version's prefix: a queued deploy past its deadline among finished records.
    The start indexes it and wakes its worker, which ends it; the index follows."""
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    service = f"svc-{secrets.token_hex(3)}"
    stale = a_record(
        service,
        step=DeployStep.QUEUED,
        policy=ServicePolicy(deploy_deadline=1),
        created_at=now() - timedelta(minutes=5),
    )
    await put_unindexed(etcd_client, prefix, stale)
    for _ in range(3):
        await put_unindexed(etcd_client, prefix, a_record(service, DeployState.SUCCEEDED))
    async with running_api(aiohttp_client, etcd_endpoint, localfleet, prefix=prefix) as api:
        store = api.deployster.store
        assert await etcd_client.get(keys.unfinished_marker(prefix).encode()) is not None

        async def ended() -> DeployRecord | None:
            record = await store.get_deploy(service, stale.id)
            return record if record is not None and record.state.finished else None

        done = await eventually(ended, timeout=15)
        assert done.state is DeployState.FAILED and "deadline" in (done.error or "")
        assert await indexed(store) == set()


async def test_a_start_and_the_resync_find_unfinished_deploys_through_the_index(
    aiohttp_client, etcd_endpoint: str, localfleet: str, etcd_client: aetcd.Client
) -> None:  # type: ignore[no-untyped-def]
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    async with running_api(aiohttp_client, etcd_endpoint, localfleet, prefix=prefix) as api:
        # Queued behind a lock someone else holds: unfinished for as long as the test runs.
        service = api.service
        async with etcd.client(etcd_endpoint) as other:
            lease = await other.lease(60)
            await other.put(
                f"{keys.locks_base(prefix)}/{service}".encode(),
                b'{"holder": "someone", "lease": %d}' % lease.id,
                lease=lease.id,
            )
            queued = await api.deployster.store.save_deploy(
                a_record(service, step=DeployStep.QUEUED, policy=ServicePolicy(deploy_deadline=60))
            )
            # Garbage in the index: the resync goes on, and so does the API.
            await etcd_client.put(f"{prefix}/unfinished/x".encode(), b"garbage")
            assert await api.deployster.deploys._unfinished_services() == {service: 1}
            assert (await api.client.get("/readyz")).status == 200
            resp = await api.client.get("/v1/services", headers=api.auth)
            assert resp.status == 200, await resp.text()

            # A second server on the prefix finds the deploy at its start.
            async with running_api(
                aiohttp_client, etcd_endpoint, localfleet, prefix=prefix
            ) as peer:
                assert await peer.deployster.deploys.resume() == 1
            record = await api.deployster.store.get_deploy(service, queued.id)
            assert record is not None and record.step is DeployStep.QUEUED
            await other.revoke_lease(lease.id)
