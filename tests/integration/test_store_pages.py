"""Records past gRPC's 4 MiB answer: read in pages against a real etcd, and honest when they
cannot be read."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import aetcd
import pytest
from integration.conftest import running_api

from deployster import etcd, keys
from deployster.config import Settings
from deployster.etcd import Endpoint, EtcdError, range_pages
from deployster.records import DeployRecord, DeployState
from deployster.server import Deployster
from deployster.store import Store

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def record(service: str, n: int, padding: int) -> DeployRecord:
    """A finished deploy record of about ``padding`` bytes (a long error sentence)."""
    return DeployRecord(
        id=f"20260101-000000-{n:06x}",
        service=service,
        version=f"v{n}",
        timestamp="2026.01.01-00.00.00",
        instance_count=3,
        destroy_previous=True,
        state=DeployState.SUCCEEDED,
        error="x" * padding,
        created_at=EPOCH + timedelta(seconds=n),
    )


async def put_all(client: aetcd.Client, store: Store, records: list[DeployRecord]) -> None:
    """Written 100 to a transaction (etcd allows 128 operations in one)."""
    txn = client.transactions
    for start in range(0, len(records), 100):
        puts = [
            txn.put(
                keys.deploy_key(store.prefix, r.service, r.id).encode(),
                r.model_dump_json().encode(),
            )
            for r in records[start : start + 100]
        ]
        await client.transaction(compare=[], success=puts, failure=[])


def small_client(endpoint: str, max_bytes: int) -> aetcd.Client:
    """A client whose answers are capped at ``max_bytes``: the 4 MiB wall in miniature."""
    at = Endpoint.parse(endpoint)
    return aetcd.Client(
        host=at.host, port=at.port, options={"grpc.max_receive_message_length": max_bytes}
    )


async def test_records_past_four_mib_list_start_and_answer(
    aiohttp_client, etcd_endpoint: str, localfleet: str, etcd_client: aetcd.Client
) -> None:  # type: ignore[no-untyped-def]
    async with running_api(aiohttp_client, etcd_endpoint, localfleet) as api:
        store = api.deployster.store
        services = [f"many-{secrets.token_hex(2)}-{i:03}" for i in range(120)]
        records = [record(s, i * 10 + k, 4000) for i, s in enumerate(services) for k in range(10)]
        await put_all(etcd_client, store, records)  # 1,200 records, about 5 MiB

        # The wall is real: one answer with every record is refused at gRPC's default limit.
        async with small_client(etcd_endpoint, 4 * 1024 * 1024) as default_limit:
            with pytest.raises(aetcd.ClientError):
                await default_limit.get_prefix(f"{store.prefix}/deploys/".encode())
            assert len(await Store(default_limit, store.prefix).list_deploys()) == 1200

        listed = await store.list_deploys()
        assert [r.id for r in listed] == [r.id for r in records]  # oldest first, none lost
        resp = await api.client.get("/v1/services", headers=api.auth)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert {s["name"] for s in body["services"]} >= set(services)
        assert (await api.client.get("/readyz")).status == 200

        # A second server on the same records starts and resumes nothing (all finished).
        second = await Deployster.connect(
            Settings(
                etcd=etcd_endpoint,
                etcd_prefix=store.prefix,
                fleet_endpoint=localfleet,
                password="x",
                router="vulcand",
                template="workload",
            )  # type: ignore[call-arg]
        )
        try:
            assert await second.start() == 0
        finally:
            await second.close()


async def test_pages_shrink_to_fit_the_message_limit(
    etcd_endpoint: str, etcd_client: aetcd.Client
) -> None:
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    store = Store(etcd_client, prefix)
    records = [record("svc", n, 2000) for n in range(20)]
    await put_all(etcd_client, store, records)
    async with small_client(etcd_endpoint, 8 * 1024) as capped:
        pages = [page async for page in range_pages(capped, f"{prefix}/deploys/".encode())]
        assert sum(len(page) for page in pages) == 20
        assert max(len(page) for page in pages) <= 3  # 8 KiB holds three records of 2 KB
        assert [r.id for r in await Store(capped, prefix).list_deploys("svc")] == [
            r.id for r in records
        ]
        # A value bigger than the limit cannot be read at all: an EtcdError, not a hang.
        await store.save_deploy(record("big", 99, 20_000))
        with pytest.raises(EtcdError):
            await Store(capped, prefix).list_deploys("big")


async def test_an_undecodable_record_is_left_out_and_logged(
    etcd_client: aetcd.Client, log_lines: list[dict[str, object]]
) -> None:
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    store = Store(etcd_client, prefix)
    await store.save_deploy(record("svc", 1, 10))
    await etcd_client.put(f"{prefix}/deploys/svc/garbage".encode(), b"\xff{not json")
    assert [r.id for r in await store.list_deploys()] == [record("svc", 1, 10).id]
    assert any(
        line["event"] == "record_unreadable" and str(line["key"]).endswith("/garbage")
        for line in log_lines
    )


async def test_readyz_is_false_when_the_records_cannot_be_read(
    aiohttp_client, etcd_endpoint: str, localfleet: str
) -> None:  # type: ignore[no-untyped-def]
    async with running_api(aiohttp_client, etcd_endpoint, localfleet) as api:
        store = api.deployster.store
        await store.save_deploy(record(api.service, 1, 20_000))
        assert (await api.client.get("/readyz")).status == 200
        async with small_client(etcd_endpoint, 8 * 1024) as capped:
            store.etcd = capped  # etcd answers status requests, but not with the records
            resp = await api.client.get("/readyz")
            store.etcd = api.deployster.etcd
        assert resp.status == 503
        assert await resp.json() == {
            "error": "unavailable",
            "description": "Deployster is not ready: it cannot read its deploy records in etcd.",
        }


async def test_a_default_client_sets_the_message_limit(etcd_endpoint: str) -> None:
    async with etcd.client(etcd_endpoint) as client:
        options = dict(client._options)
    assert options["grpc.max_receive_message_length"] == etcd.MAX_MESSAGE_BYTES


async def test_summaries_of_every_service_read_only_what_changed(
    etcd_client: aetcd.Client, log_lines: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    store = Store(etcd_client, prefix)
    await put_all(
        etcd_client, store, [record(f"svc{s}", n, 10) for s in range(4) for n in range(s, s + 3)]
    )
    await etcd_client.put(f"{prefix}/deploys/svc0/garbage".encode(), b"\xff{not json")
    read: list[bytes] = []  # the prefixes whose values were read

    def spied(client: aetcd.Client, prefix: bytes, *args: int) -> object:
        read.append(prefix)
        return range_pages(client, prefix, *args)

    monkeypatch.setattr("deployster.store.range_pages", spied)

    def ids() -> list[tuple[str, str, str]]:
        return [(r.service, r.id, r.state.value) for r in found]

    found = await store.deploy_summaries()
    assert read == [f"{prefix}/deploys/".encode()]  # the first read: everything, one paged read
    assert len(found) == 12 and ids() == sorted(ids(), key=lambda i: (i[1], i[0]))
    garbage_logged = [line for line in log_lines if line["event"] == "record_unreadable"]
    assert len(garbage_logged) == 1

    read.clear()
    assert [r.id for r in await store.deploy_summaries()] == [r.id for r in found]
    assert read == []  # nothing changed: no value read

    changed = record("svc2", 3, 10)
    changed.state = DeployState.FAILED
    await store.save_deploy(changed)  # changed
    await store.save_deploy(record("svc3", 9, 10))  # new
    await store.delete_deploys([record("svc1", 1, 10)])  # gone
    found = await store.deploy_summaries()
    assert read == [f"{prefix}/deploys/svc2/".encode(), f"{prefix}/deploys/svc3/".encode()]
    assert ("svc2", changed.id, "failed") in ids()
    assert ("svc3", record("svc3", 9, 10).id, "succeeded") in ids()
    assert all(i[:2] != ("svc1", record("svc1", 1, 10).id) for i in ids()) and len(found) == 12
    # The garbage record, unchanged, is neither read nor logged again.
    assert len([line for line in log_lines if line["event"] == "record_unreadable"]) == 1


async def test_summaries_of_an_unreachable_etcd_are_an_etcd_error(etcd_endpoint: str) -> None:
    client = small_client("127.0.0.1:1", 1024)
    store = Store(client, "/deployster-test-unreachable")
    with pytest.raises(EtcdError):
        await store.deploy_summaries()
    await client.close()
