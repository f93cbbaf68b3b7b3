"""LeaseKeeper / keep_lease_alive (docs/etcd.md §3.2) against real etcd."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import pytest

from deployster.etcd import LeaseExpiredError, LeaseKeeper, client, keep_lease_alive
from deployster.launchers import EtcdServer
from tests.helpers import eventually


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[aetcd.Client]:
    async with client(etcd_endpoint) as c:
        yield c


@pytest.fixture
def key() -> bytes:
    return f"/lease-test/{secrets.token_hex(4)}".encode()


async def gone(etcd: aetcd.Client, key: bytes) -> bool:
    return await etcd.get(key) is None


async def test_kept_alive_key_outlives_its_ttl(etcd: aetcd.Client, key: bytes) -> None:
    async with LeaseKeeper(etcd, ttl=2) as keeper:
        await etcd.put(key, b"x", lease=keeper.lease_id)
        await asyncio.sleep(5)  # time itself is under test: 2.5 TTLs
        assert await etcd.get(key) is not None
        assert not keeper.expired.is_set()
    # Leaving the context revokes: the key is gone at once.
    assert await etcd.get(key) is None


async def test_revoke_deletes_the_key_at_once(etcd: aetcd.Client, key: bytes) -> None:
    keeper = LeaseKeeper(etcd, ttl=10)
    await keeper.grant()
    await etcd.put(key, b"x", lease=keeper.lease_id)
    await keeper.revoke()
    assert await etcd.get(key) is None
    with pytest.raises(RuntimeError):
        keeper.lease_id  # noqa: B018


async def test_stopped_keeper_lets_the_key_expire_within_ttl(
    etcd: aetcd.Client, key: bytes
) -> None:
    keeper = LeaseKeeper(etcd, ttl=2)
    await keeper.grant()
    await etcd.put(key, b"x", lease=keeper.lease_id)
    await keeper.stop()  # no revoke
    began = time.monotonic()
    assert await etcd.get(key) is not None
    await eventually(lambda: gone(etcd, key), timeout=4)
    assert time.monotonic() - began < 3.0 + 0.5  # TTL + 1 s, plus polling slack


async def test_expiry_signal_when_the_lease_is_revoked_behind_its_back(
    etcd: aetcd.Client, key: bytes, log_lines: list[dict[str, object]]
) -> None:
    expired_ids: list[int] = []

    async def on_expired(lease_id: int) -> None:
        expired_ids.append(lease_id)

    keeper = LeaseKeeper(etcd, ttl=3, on_expired=on_expired)
    first = await keeper.grant()
    await etcd.revoke_lease(first)
    await asyncio.wait_for(keeper.expired.wait(), 3)  # found on the next tick (1 s)
    assert expired_ids == [first]
    assert any(line["event"] == "etcd_lease_expired" for line in log_lines)
    # The owner re-grants and re-registers.
    second = await keeper.grant()
    assert second != first and not keeper.expired.is_set()
    await etcd.put(key, b"again", lease=second)
    await keeper.revoke()
    assert await etcd.get(key) is None


async def test_keep_lease_alive_raises_for_a_missing_lease(etcd: aetcd.Client) -> None:
    lease = await etcd.lease(5)
    await etcd.revoke_lease(lease.id)
    with pytest.raises(LeaseExpiredError):
        await asyncio.wait_for(keep_lease_alive(etcd, lease.id, 1), 2)


async def test_outage_shorter_than_ttl_keeps_the_lease(
    private_etcd: EtcdServer, tmp_path: Path, key: bytes, log_lines: list[dict[str, object]]
) -> None:
    """etcd down ~1 s under a TTL of 4 s: refreshes fail and are skipped, the lease survives.

    (etcd restores leases on restart with a fresh TTL, so this also holds for longer outages;
    a TTL of 4 rather than 2 leaves room for etcd's own start-up time on a slow machine.)
    """
    etcd = client(private_etcd.endpoint)
    async with etcd, LeaseKeeper(etcd, ttl=4) as keeper:
        await etcd.put(key, b"x", lease=keeper.lease_id)
        await asyncio.to_thread(private_etcd.stop)
        await asyncio.sleep(1.0)  # the outage itself
        private_etcd.start(log_path=tmp_path / "etcd.log")
        await asyncio.to_thread(private_etcd.wait_ready)
        await asyncio.sleep(4.5)  # over a whole TTL after the restart: refreshes resumed
        assert await etcd.get(key) is not None
        assert not keeper.expired.is_set()
    assert any(line["event"] == "etcd_lease_refresh_failed" for line in log_lines)
