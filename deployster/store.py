"""Deployster's records in etcd, read and written: deploys, policies, webhook pushes, tasks,
notifications and per-service locks. The records themselves are `deployster.records`; where each
lives is `deployster.keys`.

etcd is Deployster's memory: the process can be killed at any point and pick up from here.
Every write replaces a whole record.

Lists are read in pages (`etcd.range_pages`), never in one answer: a thousand services with ten
records each is 10,000 records of several KB, far above what one gRPC answer may carry. A
record that cannot be decoded is logged and left out of lists, so one bad value cannot take
every listing down with it.

What needs no record's content never reads one: the unfinished deploys are an index of empty
keys (``unfinished/<service>/<id>``) written or deleted in the same transaction as every write
of a deploy record, and the services with their record counts come from the deploy keys alone
(`etcd.key_pages`). So a start, the periodic look for deploys nobody drives and the reaper's
pass read keys, and records only where they act.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import aetcd
import structlog
from pydantic import ValidationError

from deployster import keys
from deployster.aio import cancel_and_wait
from deployster.etcd import (
    SMALL_PAGE_SIZE,
    EtcdError,
    LeaseKeeper,
    WatchEvent,
    key_pages,
    range_pages,
    watch_prefix,
)
from deployster.events import now
from deployster.notify import REVEAL, Delivery, DeliveryOutcome
from deployster.policy import ServicePolicy
from deployster.records import DeployRecord, DeploySummary, LockHolder, TaskRecord

log = structlog.get_logger(__name__)

LOCK_TTL = 15  # seconds a crashed server's lock (a deploy's or a task's) outlives it
TXN_RECORDS = 50  # records deleted per transaction: two operations each, etcd allows 128


@contextmanager
def _etcd_errors() -> Iterator[None]:
    try:
        yield
    except aetcd.ClientError as exc:
        raise EtcdError(f"etcd did not answer: {exc}") from exc


class LeaseLocks:
    """Per-service locks, one etcd key each under ``<base>/<service>``, bound to the holder's
    lease: a holder that dies releases its lock with its lease. etcd failures come out as
    ``EtcdError``."""

    def __init__(self, etcd: aetcd.Client, base: str) -> None:
        self.etcd = etcd
        self.base = base

    def _key(self, service: str) -> bytes:
        return f"{self.base}/{service}".encode()

    async def acquire(self, service: str, holder: LockHolder) -> LockHolder | None:
        """Take the lock of ``service``: ``None`` when taken, else who holds it."""
        key = self._key(service)
        txn = self.etcd.transactions
        with _etcd_errors():
            taken, _ = await self.etcd.transaction(
                compare=[txn.version(key) == 0],
                success=[txn.put(key, holder.model_dump_json().encode(), lease=holder.lease)],
                failure=[],
            )
            if taken:
                return None
            kv = await self.etcd.get(key)
        if kv is None:  # released between the two calls: try again
            return await self.acquire(service, holder)
        return LockHolder.model_validate_json(kv.value)

    async def holder(self, service: str) -> LockHolder | None:
        with _etcd_errors():
            kv = await self.etcd.get(self._key(service))
        return None if kv is None else LockHolder.model_validate_json(kv.value)

    async def take(
        self, service: str, holder: str, *, actor: str, reason: str, ttl: int, adopt: bool = False
    ) -> LeaseKeeper | LockHolder:
        """Take the lock on a new lease kept alive by the returned keeper; with ``adopt``, a
        lock ``holder`` already holds (a previous run of this server) is kept on its lease.
        When someone else holds it: who, and no lease is left behind."""
        keeper = LeaseKeeper(self.etcd, ttl=ttl)
        if adopt:
            current = await self.holder(service)
            if current is not None and current.holder == holder:
                keeper.adopt(current.lease)
                return keeper
        with _etcd_errors():
            await keeper.grant()
        held = await self.acquire(
            service, LockHolder(holder=holder, actor=actor, reason=reason, lease=keeper.lease_id)
        )
        if held is None:
            return keeper
        # Held, even by the same holder name: on another lease it is someone else's (a peer
        # server resuming the same deploy), never to be shared.
        with _etcd_errors():
            await keeper.revoke()
        return held

    async def release(self, service: str, holder: str) -> None:
        """Release the lock if ``holder`` (a deploy or task id) still holds it."""
        key = self._key(service)
        txn = self.etcd.transactions
        with _etcd_errors():
            kv = await self.etcd.get(key)
            if kv is None or LockHolder.model_validate_json(kv.value).holder != holder:
                return
            await self.etcd.transaction(
                compare=[txn.value(key) == kv.value], success=[txn.delete(key)], failure=[]
            )


_Record = TypeVar("_Record", "DeployRecord", "DeploySummary", "TaskRecord")


async def _read_records(etcd: aetcd.Client, prefix: bytes, model: type[_Record]) -> list[_Record]:
    """Every record under ``prefix`` that decodes, read in pages; oldest first."""
    records = []
    async for page in range_pages(etcd, prefix):
        for key, value in page:
            try:
                records.append(model.model_validate_json(value))
            except ValidationError as exc:
                log.warning("record_unreadable", key=key.decode(errors="replace"), error=str(exc))
    return sorted(records, key=lambda r: (r.created_at, r.id))


class _Summaries:
    """Every deploy record's summary, kept between reads. A read lists the deploy keys with the
    revision each was last written at (keys only: 10,000 records are tens of KB to send, not
    77 MB) and reads the values only of the services whose records are new or changed since
    the last read (every record, in one paged read, when most of them are: the first read).
    A key gone is dropped; a record that does not decode is logged once and left out."""

    def __init__(self, etcd: aetcd.Client, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self._kept: dict[bytes, tuple[int, DeploySummary | None]] = {}

    async def read(self) -> list[DeploySummary]:
        base = keys.deploys_prefix(self.prefix)
        listed: dict[bytes, int] = {}
        async for revisions in key_pages(self.etcd, base.encode()):
            listed.update(revisions)
        kept = {k: v for k, v in self._kept.items() if listed.get(k) == v[0]}
        stale = [k for k in listed if k not in kept]
        if len(stale) > len(listed) // 2:
            prefixes = [base]
        else:
            changed = (
                keys.parse_deploy_key(self.prefix, k.decode(errors="replace")) for k in stale
            )
            services = sorted({found[0] for found in changed if found is not None})
            prefixes = [keys.deploys_prefix(self.prefix, service) for service in services]
        for prefix in prefixes:
            async for page in range_pages(self.etcd, prefix.encode()):
                for key, value in page:
                    if key in listed and key not in kept:  # a newer write waits for the next read
                        kept[key] = (listed[key], self._decode(key, value))
        self._kept = kept
        found = [summary for _, summary in kept.values() if summary is not None]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    @staticmethod
    def _decode(key: bytes, value: bytes) -> DeploySummary | None:
        try:
            return DeploySummary.model_validate_json(value)
        except ValidationError as exc:
            log.warning("record_unreadable", key=key.decode(errors="replace"), error=str(exc))
            return None


@dataclass(frozen=True)
class QueuedPush:
    """A service's queued push as read from etcd: its JSON (unchecked: it may be garbage) and
    the revision it was read at, which a write or a take compares against."""

    service: str
    value: str = field(repr=False)  # a Docker Hub callback URL inside is a secret
    revision: int


class Store:
    """Records in etcd. etcd failures come out as ``EtcdError`` (the API answers 503)."""

    def __init__(self, etcd: aetcd.Client, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix.rstrip("/")
        self.locks = LeaseLocks(etcd, keys.locks_base(self.prefix))  # one deploy per service
        self._garbage_logged: set[str] = set()  # index keys outside the layout, logged once
        self._summaries = _Summaries(etcd, self.prefix)

    async def ping(self) -> None:
        """Raises ``EtcdError`` unless etcd answers a status request."""
        with _etcd_errors():
            await self.etcd.status()

    async def check_records(self) -> None:
        """Raises ``EtcdError`` unless the deploy records can be read (one page is enough: every
        list reads the same way)."""
        async for _ in range_pages(
            self.etcd, keys.deploys_prefix(self.prefix).encode(), page_size=1
        ):
            return

    async def save_deploy(self, record: DeployRecord) -> DeployRecord:
        """Stamp ``record`` (updated, and finished when it just ended) and write it; returns
        it. Like ``TaskStore.save``, the caller's record is the one saved, not a copy."""
        record.updated_at = now()
        if record.state.finished and record.finished_at is None:
            record.finished_at = record.updated_at
        with _etcd_errors():
            await self.etcd.transaction(compare=[], success=self._deploy_writes(record), failure=[])
        return record

    def _deploy_writes(self, record: DeployRecord) -> list[object]:
        """Writing ``record``: its key and, in the same transaction, its entry in the index of
        unfinished deploys (put while unfinished, deleted once finished)."""
        txn = self.etcd.transactions
        index = keys.unfinished_key(self.prefix, record.service, record.id).encode()
        return [
            txn.put(
                keys.deploy_key(self.prefix, record.service, record.id).encode(),
                record.model_dump_json().encode(),
            ),
            txn.delete(index) if record.state.finished else txn.put(index, b""),
        ]

    async def get_deploy(self, service: str, deploy_id: str) -> DeployRecord | None:
        with _etcd_errors():
            kv = await self.etcd.get(keys.deploy_key(self.prefix, service, deploy_id).encode())
        return None if kv is None else DeployRecord.model_validate_json(kv.value)

    async def list_deploys(self, service: str | None = None) -> list[DeployRecord]:
        """Records, oldest first; all services when ``service`` is None."""
        prefix = keys.deploys_prefix(self.prefix, service or None).encode()
        return await _read_records(self.etcd, prefix, DeployRecord)

    async def deploy_summaries(self, service: str | None = None) -> list[DeploySummary]:
        """``list_deploys`` for listings that need no more than a ``DeploySummary``. Those of
        every service are kept between calls (`_Summaries`): a call reads only the records
        written since the last one."""
        if service:
            prefix = keys.deploys_prefix(self.prefix, service).encode()
            return await _read_records(self.etcd, prefix, DeploySummary)
        return await self._summaries.read()

    async def delete_deploys(self, records: Iterable[DeployRecord | DeploySummary]) -> None:
        """Delete records with their index entries, each record in the same transaction as
        its entry."""
        txn = self.etcd.transactions
        doomed = [
            txn.delete(key(self.prefix, r.service, r.id).encode())
            for r in records
            for key in (keys.deploy_key, keys.unfinished_key)
        ]
        step = 2 * TXN_RECORDS
        with _etcd_errors():
            for start in range(0, len(doomed), step):
                await self.etcd.transaction(
                    compare=[], success=doomed[start : start + step], failure=[]
                )

    async def deploy_counts(self) -> dict[str, int]:
        """How many deploy records each service has, from their keys alone (no record read)."""
        counts: dict[str, int] = {}
        async for page in key_pages(self.etcd, keys.deploys_prefix(self.prefix).encode()):
            for raw, _ in page:
                parsed = keys.parse_deploy_key(self.prefix, raw.decode(errors="replace"))
                if parsed is not None:
                    counts[parsed[0]] = counts.get(parsed[0], 0) + 1
        return counts

    async def unfinished_deploys(self) -> dict[str, list[str]]:
        """The ids of the unfinished deploys by service: the index (keys only), each entry
        checked against its record. A key outside the index's layout is logged (once) and
        left out; an entry whose record is finished, gone or unreadable (written by hand, or by
        an older version) is dropped from the index."""
        found: dict[str, list[str]] = {}
        async for page in key_pages(self.etcd, keys.unfinished_prefix(self.prefix).encode()):
            for raw, _ in page:
                key = raw.decode(errors="replace")
                parsed = keys.parse_unfinished_key(self.prefix, key)
                if parsed is None:
                    if key not in self._garbage_logged:
                        self._garbage_logged.add(key)
                        log.warning("deploy_index_key_unreadable", key=key)
                    continue
                service, deploy_id = parsed
                if await self._still_unfinished(service, deploy_id):
                    found.setdefault(service, []).append(deploy_id)
        return found

    async def _still_unfinished(self, service: str, deploy_id: str) -> bool:
        """Whether the indexed deploy's record is unfinished; if not, its entry goes (unless
        the record changed since it was read here)."""
        key = keys.deploy_key(self.prefix, service, deploy_id).encode()
        with _etcd_errors():
            kv = await self.etcd.get(key)
        if kv is not None:
            try:
                if not DeploySummary.model_validate_json(kv.value).state.finished:
                    return True
            except ValidationError as exc:
                log.warning("record_unreadable", key=key.decode(), error=str(exc))
        txn = self.etcd.transactions
        unchanged = txn.version(key) == 0 if kv is None else txn.mod(key) == kv.mod_revision
        index = keys.unfinished_key(self.prefix, service, deploy_id).encode()
        with _etcd_errors():
            await self.etcd.transaction(
                compare=[unchanged], success=[txn.delete(index)], failure=[]
            )
        log.warning("deploy_index_entry_dropped", service=service, deploy_id=deploy_id)
        return False

    async def index_unfinished(self) -> int:
        """Index the unfinished deploys among records written before the index existed: once
        per prefix (a marker key says it was done), with one full read of the records. Returns
        how many it indexed; 0 at once when the marker is there."""
        marker = keys.unfinished_marker(self.prefix).encode()
        with _etcd_errors():
            if await self.etcd.get(marker) is not None:
                return 0
        txn = self.etcd.transactions
        indexed = 0
        async for page in range_pages(self.etcd, keys.deploys_prefix(self.prefix).encode()):
            for key, value in page:
                parsed = keys.parse_deploy_key(self.prefix, key.decode(errors="replace"))
                try:
                    if parsed is None or DeploySummary.model_validate_json(value).state.finished:
                        continue
                except ValidationError:
                    continue  # unreadable: left out of every list, nobody drives it
                index = keys.unfinished_key(self.prefix, *parsed).encode()
                # Only if the record is as read: a deploy that finished meanwhile (on a server
                # that keeps the index) is not indexed again.
                with _etcd_errors():
                    done, _ = await self.etcd.transaction(
                        compare=[txn.value(key) == value],
                        success=[txn.put(index, b"")],
                        failure=[],
                    )
                indexed += bool(done)
        with _etcd_errors():
            await self.etcd.put(marker, now().isoformat().encode())
        log.info("deploy_index_built", unfinished=indexed)
        return indexed

    async def announcements(self) -> dict[str, str]:
        """Every instance announcement now: key to its JSON value."""
        found: dict[str, str] = {}
        prefix = keys.instances_prefix(self.prefix).encode()
        async for page in range_pages(self.etcd, prefix, SMALL_PAGE_SIZE):
            found.update((key.decode(), value.decode()) for key, value in page)
        return found

    async def withdraw_announcement(self, key: str, value: str) -> bool:
        """Delete an announcement if it still holds ``value``, so that a fresh one under the same
        key is never lost; True when it was deleted."""
        txn = self.etcd.transactions
        with _etcd_errors():
            deleted, _ = await self.etcd.transaction(
                compare=[txn.value(key.encode()) == value.encode()],
                success=[txn.delete(key.encode())],
                failure=[],
            )
        return bool(deleted)

    async def follow_deploy(self, service: str, deploy_id: str) -> AsyncIterator[DeployRecord]:
        """The record now, then again each time it changes, until it is finished or deleted.
        An etcd restart or a compaction loses nothing (the resumable watch)."""
        key = keys.deploy_key(self.prefix, service, deploy_id)
        changes: asyncio.Queue[str | None] = asyncio.Queue()

        async def on_event(event: WatchEvent) -> None:
            if event.key == key:
                changes.put_nowait(event.value)

        async def on_resync(snapshot: dict[str, str], _revision: int) -> None:
            changes.put_nowait(snapshot.get(key))

        watch = asyncio.create_task(
            watch_prefix(self.etcd, key, on_event, on_resync), name=f"follow:{service}:{deploy_id}"
        )
        try:
            while (value := await changes.get()) is not None:
                record = DeployRecord.model_validate_json(value)
                yield record
                if record.state.finished:
                    return
        finally:
            await cancel_and_wait(watch)

    async def save_policy(self, service: str, policy: ServicePolicy) -> None:
        """Only the fields that were set are stored: the others follow the server's defaults."""
        with _etcd_errors():
            await self.etcd.put(
                keys.policy_key(self.prefix, service).encode(),
                # Notification secrets are written out here, and only here.
                policy.model_dump_json(exclude_unset=True, context=REVEAL).encode(),
            )

    async def get_policy(self, service: str) -> ServicePolicy:
        with _etcd_errors():
            kv = await self.etcd.get(keys.policy_key(self.prefix, service).encode())
        return ServicePolicy() if kv is None else ServicePolicy.model_validate_json(kv.value)

    # -- webhooks: policies by service, de-duplication, queued pushes ----------------------

    async def list_policies(self) -> dict[str, ServicePolicy]:
        """Every stored policy by service (a webhook's repository may map to any of them)."""
        policies = {}
        async for page in range_pages(self.etcd, keys.services_prefix(self.prefix).encode()):
            for key, value in page:
                service = keys.policy_service(self.prefix, key.decode())
                if service is not None:
                    policies[service] = ServicePolicy.model_validate_json(value)
        return policies

    async def first_seen(self, key: str, value: str, ttl: int) -> bool:
        """Remember ``key`` under ``<prefix>/webhooks/seen/`` for ``ttl`` seconds: True the first
        time, False while it is remembered (one etcd transaction, so two deliveries at once
        cannot both be first)."""
        full = keys.seen_key(self.prefix, key).encode()
        txn = self.etcd.transactions
        with _etcd_errors():
            lease = await self.etcd.lease(ttl)
            first, _ = await self.etcd.transaction(
                compare=[txn.version(full) == 0],
                success=[txn.put(full, value.encode(), lease=lease.id)],
                failure=[],
            )
            if not first:
                await self.etcd.revoke_lease(lease.id)
        return bool(first)

    async def forget_seen(self, key: str) -> None:
        with _etcd_errors():
            await self.etcd.delete(keys.seen_key(self.prefix, key).encode())

    async def queued_push(self, service: str) -> QueuedPush | None:
        """The push waiting to deploy ``service`` (one per service), at the revision read."""
        with _etcd_errors():
            kv = await self.etcd.get(keys.queued_key(self.prefix, service).encode())
        if kv is None:
            return None
        return QueuedPush(service, kv.value.decode(errors="replace"), kv.mod_revision)

    async def queue_push(self, service: str, push_json: str, over: QueuedPush | None) -> bool:
        """Queue a push for ``service`` in place of ``over`` (None: the slot is empty), only if
        the slot still holds it: False when another push got there first (read it again)."""
        key = keys.queued_key(self.prefix, service).encode()
        txn = self.etcd.transactions
        compare = txn.version(key) == 0 if over is None else txn.mod(key) == over.revision
        with _etcd_errors():
            queued, _ = await self.etcd.transaction(
                compare=[compare], success=[txn.put(key, push_json.encode())], failure=[]
            )
        return bool(queued)

    async def take_queued_push(
        self, queued: QueuedPush, record: DeployRecord | None = None, callback: str = ""
    ) -> bool:
        """Take ``queued`` from its slot if nothing replaced it since it was read and, in the same
        transaction, write ``record`` (the deploy it starts; None drops the push) and the
        ``callback`` to answer when that deploy ends. One transaction: of several servers one
        takes it, and a crash leaves either the push or the deploy, never both or neither."""
        txn = self.etcd.transactions
        key = keys.queued_key(self.prefix, queued.service).encode()
        writes = [txn.delete(key)]
        if record is not None:
            writes += self._deploy_writes(record)
            if callback:
                writes.append(
                    txn.put(
                        keys.callback_key(self.prefix, record.service, record.id).encode(),
                        callback.encode(),
                    )
                )
        with _etcd_errors():
            taken, _ = await self.etcd.transaction(
                compare=[txn.mod(key) == queued.revision], success=writes, failure=[]
            )
        return bool(taken)

    async def take_callback(self, service: str, deploy_id: str) -> str | None:
        """The callback kept for the deploy's end, taken (deleted) by exactly one caller."""
        key = keys.callback_key(self.prefix, service, deploy_id).encode()
        with _etcd_errors():
            deleted = await self.etcd.delete(key, prev_kv=True)
        if deleted is None or deleted.prev_kv is None:
            return None
        value: bytes = deleted.prev_kv.value
        return value.decode(errors="replace")

    async def kept_callbacks(self) -> list[tuple[str, str]]:
        """(service, deploy id) of every callback kept for a deploy's end."""
        base = keys.callbacks_prefix(self.prefix)
        with _etcd_errors():
            found = await self.etcd.get_prefix(base.encode(), keys_only=True)
        kept = (kv.key.decode()[len(base) :].partition("/") for kv in found)
        return sorted((service, deploy_id) for service, _, deploy_id in kept)

    async def queued_services(self) -> list[str]:
        """The services with a queued push."""
        base = keys.queued_prefix(self.prefix)
        with _etcd_errors():
            found = await self.etcd.get_prefix(base.encode(), keys_only=True)
        return sorted(kv.key.decode()[len(base) :] for kv in found)


class TaskStore:
    """Task records under ``<prefix>/tasks/<service>/<id>`` and the per-service task lock
    under ``<prefix>/task-locks/<service>``; etcd failures come out as ``EtcdError``."""

    def __init__(self, etcd: aetcd.Client, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix.rstrip("/")
        self.locks = LeaseLocks(etcd, keys.task_locks_base(self.prefix))  # exclusive tasks

    async def save(self, record: TaskRecord) -> None:
        if record.state.finished and record.finished_at is None:
            record.finished_at = now()
        with _etcd_errors():
            await self.etcd.put(
                keys.task_key(self.prefix, record.service, record.id).encode(),
                record.model_dump_json().encode(),
            )

    async def get(self, service: str, task_id: str) -> TaskRecord | None:
        with _etcd_errors():
            kv = await self.etcd.get(keys.task_key(self.prefix, service, task_id).encode())
        return None if kv is None else TaskRecord.model_validate_json(kv.value)

    async def list_tasks(self, service: str | None = None) -> list[TaskRecord]:
        """Records, oldest first; every service's when ``service`` is None."""
        prefix = keys.tasks_prefix(self.prefix, service or None).encode()
        return await _read_records(self.etcd, prefix, TaskRecord)

    async def prune(self, service: str, keep: int) -> int:
        """Delete the oldest finished records of ``service`` beyond ``keep``; how many went."""
        finished = [r for r in await self.list_tasks(service) if r.state.finished]
        doomed = finished[: max(0, len(finished) - keep)]
        with _etcd_errors():
            for record in doomed:
                await self.etcd.delete(keys.task_key(self.prefix, service, record.id).encode())
        return len(doomed)


# -- notifications ------------------------------------------------------------------------


class NotificationStore:
    """Pending notifications under ``<prefix>/notifications/pending/<delivery-id>`` (kept until
    delivered or given up, so a restart loses none) and the last outcomes of each service
    under ``<prefix>/notifications/outcomes/<service>/<time>-<delivery-id>``."""

    def __init__(self, etcd: aetcd.Client, prefix: str, keep: int = 20) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.keep = keep

    @property
    def pending_prefix(self) -> str:
        """Where pending deliveries live, one key per delivery id."""
        return keys.pending_prefix(self.prefix)

    async def add(self, deliveries: list[Delivery]) -> None:
        """Queue every delivery of one event in one transaction: all or none."""
        txn = self.etcd.transactions
        with _etcd_errors():
            await self.etcd.transaction(
                compare=[],
                success=[
                    txn.put(
                        keys.pending_key(self.prefix, d.id).encode(), d.model_dump_json().encode()
                    )
                    for d in deliveries
                ],
                failure=[],
            )

    async def pending(self) -> list[tuple[Delivery, bytes]]:
        """Every pending delivery that decodes, with its stored value (for :meth:`replace`);
        one that does not is logged and left out, like any unreadable record."""
        pending = []
        async for page in range_pages(self.etcd, self.pending_prefix.encode()):
            for key, value in page:
                try:
                    pending.append((Delivery.model_validate_json(value), value))
                except ValidationError as exc:
                    log.warning(
                        "record_unreadable", key=key.decode(errors="replace"), error=str(exc)
                    )
        return pending

    async def replace(self, delivery: Delivery, stored: bytes) -> bytes | None:
        """Write ``delivery`` if its stored value is still ``stored`` (nobody claimed or
        finished it meanwhile): the new stored value, or None."""
        key = keys.pending_key(self.prefix, delivery.id).encode()
        value = delivery.model_dump_json().encode()
        txn = self.etcd.transactions
        with _etcd_errors():
            done, _ = await self.etcd.transaction(
                compare=[txn.value(key) == stored],
                success=[txn.put(key, value)],
                failure=[],
            )
        return value if done else None

    async def finish(self, delivery: Delivery, outcome: DeliveryOutcome) -> None:
        """The delivery ended: forget it and keep its outcome (the last ``keep`` per service)."""
        base = keys.outcomes_prefix(self.prefix, delivery.service)
        key = f"{base}{outcome.at:017.6f}-{delivery.id}".encode()
        txn = self.etcd.transactions
        with _etcd_errors():
            await self.etcd.transaction(
                compare=[],
                success=[
                    txn.delete(keys.pending_key(self.prefix, delivery.id).encode()),
                    txn.put(key, outcome.model_dump_json().encode()),
                ],
                failure=[],
            )
            found = await self.etcd.get_prefix(base.encode(), keys_only=True)
            stored = sorted(kv.key for kv in found)
            for old in stored[: max(0, len(stored) - self.keep)]:
                await self.etcd.delete(old)

    async def outcomes(self, service: str) -> list[DeliveryOutcome]:
        """The last outcomes of ``service``, newest first."""
        with _etcd_errors():
            found = await self.etcd.get_prefix(keys.outcomes_prefix(self.prefix, service).encode())
        items = sorted(((kv.key, kv.value) for kv in found), reverse=True)
        return [DeliveryOutcome.model_validate_json(value) for _, value in items]
