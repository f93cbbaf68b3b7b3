"""The index of unfinished deploys when etcd's link dies in the middle of a write: a record
and its entry are written in one transaction, so whatever etcd applied, they agree."""

from __future__ import annotations

import asyncio
import random
import secrets

from faults.conftest import EtcdGate
from integration.test_deploy_index import a_record, indexed

from deployster import etcd
from deployster.etcd import EtcdError
from deployster.launchers import EtcdServer
from deployster.records import DeployState, DeployStep
from deployster.store import Store


async def agree(store: Store) -> None:
    """Every unfinished record has its entry, and every entry its unfinished record."""
    unfinished = {(r.service, r.id) for r in await store.list_deploys() if not r.state.finished}
    assert await indexed(store) == unfinished


async def test_a_write_cut_off_by_a_dead_link_leaves_record_and_index_agreeing(
    fault_etcd_server: EtcdServer,
) -> None:
    gate = EtcdGate(fault_etcd_server.endpoint)
    await gate.start()
    prefix = f"/deployster-test-{secrets.token_hex(4)}"
    rng = random.Random(17)
    outcomes = {"answered": 0, "cut off": 0}
    try:
        async with (
            etcd.client(fault_etcd_server.endpoint) as direct,
            etcd.client(gate.endpoint, timeout=0.5) as gated,
        ):
            store, truth = Store(gated, prefix), Store(direct, prefix)
            records = [await store.save_deploy(a_record(f"svc-{n}")) for n in range(3)]
            for n in range(12):
                record = records[n % 3].model_copy(deep=True)
                finished = record.state.finished
                record.state = DeployState.PENDING if finished else DeployState.SUCCEEDED
                record.step = DeployStep.WAITING if finished else DeployStep.DONE
                write = store.delete_deploys([record]) if n == 11 else store.save_deploy(record)
                task = asyncio.ensure_future(write)
                # The link dies before the request left, while it is on its way, or after.
                await asyncio.sleep(rng.uniform(0, 0.004))
                async with gate.blocked():
                    try:
                        await task
                        outcomes["answered"] += 1
                    except EtcdError:
                        outcomes["cut off"] += 1
                    await agree(truth)
                await asyncio.sleep(0.2)  # what the gate held reaches etcd now, or never
                await agree(truth)
                records[n % 3] = await truth.get_deploy(record.service, record.id) or record
    finally:
        await gate.close()
    assert outcomes["cut off"] > 0, outcomes  # the fault did happen
