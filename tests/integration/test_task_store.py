"""Task records in a real etcd: the layout, listing order, pruning and the per-service lock."""

from __future__ import annotations

import secrets

import aetcd

from deployster.etcd import LeaseKeeper
from deployster.records import LockHolder, TaskRecord, TaskState
from deployster.store import TaskStore


def record(task_id: str, state: TaskState, service: str = "svc") -> TaskRecord:
    return TaskRecord(
        id=task_id,
        service=service,
        version="v1",
        image="p/svc:v1",
        command=["true"],
        timeout=600,
        state=state,
    )


async def test_records_prune_and_lock(etcd_client: aetcd.Client) -> None:
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    store = TaskStore(etcd_client, prefix)
    ids = [f"20260101-00000{n}-aaaa" for n in range(5)]
    for n, task_id in enumerate(ids):
        await store.save(record(task_id, TaskState.RUNNING if n == 0 else TaskState.SUCCEEDED))
    await store.save(record("20260101-000009-other", TaskState.FAILED, service="other"))

    assert await etcd_client.get(f"{prefix}/tasks/svc/{ids[1]}".encode()) is not None
    assert [r.id for r in await store.list_tasks("svc")] == ids
    assert len(await store.list_tasks()) == 6
    finished = await store.get("svc", ids[1])
    assert finished is not None and finished.finished_at is not None

    # The two newest finished ones stay, and so does the running one, however old.
    assert await store.prune("svc", keep=2) == 2
    assert [r.id for r in await store.list_tasks("svc")] == [ids[0], ids[3], ids[4]]
    assert [r.id for r in await store.list_tasks("other")] == ["20260101-000009-other"]

    async with LeaseKeeper(etcd_client, ttl=10) as keeper:
        assert (
            await store.locks.acquire("svc", LockHolder(holder=ids[0], lease=keeper.lease_id))
            is None
        )
        async with LeaseKeeper(etcd_client, ttl=10) as other:
            held = await store.locks.acquire(
                "svc", LockHolder(holder="second", lease=other.lease_id)
            )
        assert held is not None and held.holder == ids[0]
    # Revoking the holder's lease releases the lock.
    assert await store.locks.holder("svc") is None
