"""Durable records in etcd: the deploy records under ``<prefix>/deploys/<service>/<id>``.

etcd is Deployster's memory: the process can be killed at any point and pick up from here.
Records are JSON documents of pydantic models; every write replaces the whole record. A
record carries the deploy's progress events, so the events stream is the record followed
through an etcd watch: whichever server drives the deploy, and across restarts. A record keeps
its newest ``MAX_EVENTS`` events and counts the ones it dropped, so it never grows without bound.

Lists are read in pages (`etcd.range_pages`), never in one answer: a thousand services with ten
records each is 10,000 records of several KB, far above what one gRPC answer may carry. A
record that cannot be decoded is logged and left out of lists, so one bad value cannot take
every listing down with it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

import aetcd
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployster import logs
from deployster.aio import cancel_and_wait
from deployster.etcd import EtcdError, LeaseKeeper, WatchEvent, range_pages, watch_prefix
from deployster.events import DeployRequested
from deployster.notify import REVEAL, Delivery, DeliveryOutcome
from deployster.policy import ServicePolicy
from deployster.units import instances_prefix

log = structlog.get_logger(__name__)

# Progress events kept in a deploy record: a 100-instance deploy notes about 500, and a record
# must stay far below etcd's 1.5 MiB limit on a value.
MAX_EVENTS = 200


class DeployState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def finished(self) -> bool:
        return self not in (DeployState.PENDING, DeployState.RUNNING)


class DeployStep(StrEnum):
    """Where a running deploy is; a restarted server resumes from here."""

    QUEUED = "queued"  # waiting for another deploy of the service to release its lock
    SUBMITTING = "submitting"
    WAITING = "waiting"  # for every new instance to be healthy and routed
    SWITCHING = "switching"  # deregistering, draining and destroying the previous units
    ROLLING_BACK = "rolling_back"
    DONE = "done"


def _now() -> datetime:
    return datetime.now(UTC)


class Progress(BaseModel):
    """One thing that happened in a deploy, as its events stream shows it."""

    seq: int  # 1, 2, ...: the SSE event id, for a client resuming with Last-Event-ID
    at: datetime = Field(default_factory=_now)
    kind: str  # planned, queued, submitted, instance_ready, routed, retiring, ..., succeeded
    message: str
    unit: str | None = None


def new_deploy_id() -> str:
    """Sortable by creation time (newest last), unique without coordination."""
    return _now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class DeployFields(BaseModel):
    """A deploy as the API shows it, but for ``env``: the record stores the values, the API
    shows the names (``DeployRecord.public``)."""

    id: str
    service: str
    version: str
    timestamp: str
    instance_count: int
    destroy_previous: bool
    source: str = "api"
    actor: str = ""
    state: DeployState = DeployState.PENDING
    step: DeployStep = DeployStep.SUBMITTING
    # The service's policy when the deploy started: a later change applies to the next one.
    policy: ServicePolicy = Field(default_factory=ServicePolicy)
    units: list[str] = Field(default_factory=list)
    previous_units: list[str] = Field(default_factory=list)
    error: str | None = None
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    finished_at: datetime | None = None
    started_at: float = (
        0.0  # epoch seconds the lock was taken: the deploy deadline counts from here
    )
    submitted_at: float = 0.0  # epoch seconds: instance deadlines count from here
    events: list[Progress] = Field(default_factory=list)
    events_dropped: int = 0  # the oldest events, left out to keep the newest MAX_EVENTS


class DeployRecord(DeployFields):
    # Values may be secrets: kept for re-driving the deploy, never returned by the API.
    env: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("env")
    @classmethod
    def _never_logged(cls, env: dict[str, str]) -> dict[str, str]:
        return logs.register_env(env)  # a record read back (e.g. to resume) is a deploy handled

    def note(self, kind: str, message: str, unit: str | None = None) -> None:
        """Add a progress event; it is kept (and streamed) with the record's next save. Past
        ``MAX_EVENTS`` the oldest is dropped; ``seq`` keeps counting every event."""
        seq = self.events_dropped + len(self.events) + 1
        self.events.append(Progress(seq=seq, kind=kind, message=message, unit=unit))
        if len(self.events) > MAX_EVENTS:
            del self.events[0]
            self.events_dropped += 1

    @classmethod
    def from_request(
        cls,
        event: DeployRequested,
        instance_count: int,
        destroy_previous: bool,
        policy: ServicePolicy,
    ) -> DeployRecord:
        return cls(
            id=event.deploy_id,
            service=event.service,
            version=event.version,
            timestamp=event.timestamp,
            instance_count=instance_count,
            destroy_previous=destroy_previous,
            env=event.env,
            source=event.source,
            actor=event.actor,
            policy=policy,
        )

    def public(self) -> dict[str, object]:
        """The record as the API shows it: env values are left out."""
        data = self.model_dump(mode="json", exclude={"env"})
        data["env"] = sorted(self.env)
        return data


class DeploySummary(BaseModel):
    """What a listing of every service needs of a deploy record: decoding only these fields
    of a record (not its events, environment and policy) is several times faster, and they
    take a fraction of the memory."""

    model_config = ConfigDict(extra="ignore")

    id: str
    service: str
    version: str
    timestamp: str
    state: DeployState
    created_at: datetime


@contextmanager
def _etcd_errors() -> Iterator[None]:
    try:
        yield
    except aetcd.ClientError as exc:
        raise EtcdError(f"etcd did not answer: {exc}") from exc


class LockHolder(BaseModel):
    """Who holds a service's deploy lock, and why; the key lives as long as ``lease``."""

    holder: str  # the deploy id
    actor: str = ""
    reason: str = ""
    since: datetime = Field(default_factory=_now)
    lease: int


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


class Store:
    """Records in etcd. etcd failures come out as ``EtcdError`` (the API answers 503)."""

    def __init__(self, etcd: aetcd.Client, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix.rstrip("/")
        self.locks = LeaseLocks(etcd, f"{self.prefix}/locks")  # one deploy per service

    async def ping(self) -> None:
        """Raises ``EtcdError`` unless etcd answers a status request."""
        with _etcd_errors():
            await self.etcd.status()

    async def check_records(self) -> None:
        """Raises ``EtcdError`` unless the deploy records can be read (one page is enough: every
        list reads the same way)."""
        async for _ in range_pages(self.etcd, f"{self.prefix}/deploys/".encode(), page_size=1):
            return

    def _deploy_key(self, service: str, deploy_id: str = "") -> bytes:
        return f"{self.prefix}/deploys/{service}/{deploy_id}".encode()

    async def save_deploy(self, record: DeployRecord) -> DeployRecord:
        """Stamp ``record`` (updated, and finished when it just ended) and write it; returns
        it. Like ``TaskStore.save``, the caller's record is the one saved, not a copy."""
        record.updated_at = _now()
        if record.state.finished and record.finished_at is None:
            record.finished_at = record.updated_at
        with _etcd_errors():
            await self.etcd.put(
                self._deploy_key(record.service, record.id), record.model_dump_json().encode()
            )
        return record

    async def get_deploy(self, service: str, deploy_id: str) -> DeployRecord | None:
        with _etcd_errors():
            kv = await self.etcd.get(self._deploy_key(service, deploy_id))
        return None if kv is None else DeployRecord.model_validate_json(kv.value)

    async def list_deploys(self, service: str | None = None) -> list[DeployRecord]:
        """Records, oldest first; all services when ``service`` is None."""
        prefix = self._deploy_key(service) if service else f"{self.prefix}/deploys/".encode()
        return await _read_records(self.etcd, prefix, DeployRecord)

    async def deploy_summaries(self, service: str | None = None) -> list[DeploySummary]:
        """``list_deploys`` for listings that need no more than a ``DeploySummary``."""
        prefix = self._deploy_key(service) if service else f"{self.prefix}/deploys/".encode()
        return await _read_records(self.etcd, prefix, DeploySummary)

    async def delete_deploys(self, records: Iterable[DeployRecord | DeploySummary]) -> None:
        with _etcd_errors():
            for record in records:
                await self.etcd.delete(self._deploy_key(record.service, record.id))

    async def announcements(self) -> dict[str, str]:
        """Every instance announcement now: key to its JSON value."""
        found: dict[str, str] = {}
        async for page in range_pages(self.etcd, instances_prefix(self.prefix).encode()):
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
        key = self._deploy_key(service, deploy_id).decode()
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

    def _policy_key(self, service: str) -> bytes:
        return f"{self.prefix}/services/{service}/policy".encode()

    async def save_policy(self, service: str, policy: ServicePolicy) -> None:
        """Only the fields that were set are stored: the others follow the server's defaults."""
        with _etcd_errors():
            await self.etcd.put(
                self._policy_key(service),
                # Notification secrets are written out here, and only here.
                policy.model_dump_json(exclude_unset=True, context=REVEAL).encode(),
            )

    async def get_policy(self, service: str) -> ServicePolicy:
        with _etcd_errors():
            kv = await self.etcd.get(self._policy_key(service))
        return ServicePolicy() if kv is None else ServicePolicy.model_validate_json(kv.value)

    # -- webhooks: policies by service, de-duplication, queued pushes ----------------------

    async def list_policies(self) -> dict[str, ServicePolicy]:
        """Every stored policy by service (a webhook's repository may map to any of them)."""
        base = f"{self.prefix}/services/"
        policies = {}
        async for page in range_pages(self.etcd, base.encode()):
            for key, value in page:
                service, _, rest = key.decode()[len(base) :].partition("/")
                if rest == "policy":
                    policies[service] = ServicePolicy.model_validate_json(value)
        return policies

    async def first_seen(self, key: str, value: str, ttl: int) -> bool:
        """Remember ``key`` under ``<prefix>/webhooks/seen/`` for ``ttl`` seconds: True the first
        time, False while it is remembered (one etcd transaction, so two deliveries at once
        cannot both be first)."""
        full = f"{self.prefix}/webhooks/seen/{key}".encode()
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
            await self.etcd.delete(f"{self.prefix}/webhooks/seen/{key}".encode())

    def _queued_key(self, service: str) -> bytes:
        return f"{self.prefix}/webhooks/queued/{service}".encode()

    async def save_queued_push(self, service: str, push_json: str) -> None:
        """The push waiting to deploy ``service`` (one per service: the latest wins)."""
        with _etcd_errors():
            await self.etcd.put(self._queued_key(service), push_json.encode())

    async def delete_queued_push(self, service: str, push_json: str) -> bool:
        """Forget (take) the queued push of ``service`` if it is still ``push_json``: True
        when it was, so that of several servers exactly one deploys it."""
        key = self._queued_key(service)
        txn = self.etcd.transactions
        with _etcd_errors():
            taken, _ = await self.etcd.transaction(
                compare=[txn.value(key) == push_json.encode()],
                success=[txn.delete(key)],
                failure=[],
            )
        return bool(taken)

    async def restore_queued_push(self, service: str, push_json: str) -> bool:
        """Put a taken push back unless a newer one was queued meanwhile; True if put back."""
        key = self._queued_key(service)
        txn = self.etcd.transactions
        with _etcd_errors():
            restored, _ = await self.etcd.transaction(
                compare=[txn.version(key) == 0],
                success=[txn.put(key, push_json.encode())],
                failure=[],
            )
        return bool(restored)

    async def list_queued_pushes(self) -> list[str]:
        return [
            value.decode()
            async for page in range_pages(self.etcd, f"{self.prefix}/webhooks/queued/".encode())
            for _, value in page
        ]


# -- tasks --------------------------------------------------------------------------------


class TaskState(StrEnum):
    PENDING = "pending"  # pulling the image, creating the container
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # exit code 0
    FAILED = "failed"  # any other exit code
    TIMED_OUT = "timed_out"  # killed at its limit: exit code 124
    ERROR = "error"  # never started, or lost (the sentence in ``error`` says which)

    @property
    def finished(self) -> bool:
        return self not in (TaskState.PENDING, TaskState.RUNNING)


def new_task_id() -> str:
    """Sortable by creation time (newest last), unique without coordination."""
    return _now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(4)


class TaskRecord(BaseModel):
    """One one-off task: what ran, how it ended, and the end of its output."""

    id: str
    service: str
    version: str
    image: str
    command: list[str]  # the container's Cmd
    timeout: float
    # Only the names: the values may be secrets.
    env: list[str] = Field(default_factory=list)
    container: str = ""  # the container's name, unique per task
    actor: str = ""
    state: TaskState = TaskState.PENDING
    exit_code: int | None = None
    error: str = ""
    cleanup_error: str = ""  # the container could not be removed
    output: str = ""  # the last bytes of stdout and stderr, as they interleaved
    output_truncated: bool = False  # earlier output was dropped from ``output``
    created_at: datetime = Field(default_factory=_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def public(self) -> dict[str, object]:
        return self.model_dump(mode="json")


class TaskStore:
    """Task records under ``<prefix>/tasks/<service>/<id>`` and the per-service task lock
    under ``<prefix>/task-locks/<service>``; etcd failures come out as ``EtcdError``."""

    def __init__(self, etcd: aetcd.Client, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix.rstrip("/")
        self.locks = LeaseLocks(etcd, f"{self.prefix}/task-locks")  # exclusive tasks

    def _key(self, service: str, task_id: str = "") -> bytes:
        return f"{self.prefix}/tasks/{service}/{task_id}".encode()

    async def save(self, record: TaskRecord) -> None:
        if record.state.finished and record.finished_at is None:
            record.finished_at = _now()
        with _etcd_errors():
            await self.etcd.put(
                self._key(record.service, record.id), record.model_dump_json().encode()
            )

    async def get(self, service: str, task_id: str) -> TaskRecord | None:
        with _etcd_errors():
            kv = await self.etcd.get(self._key(service, task_id))
        return None if kv is None else TaskRecord.model_validate_json(kv.value)

    async def list_tasks(self, service: str | None = None) -> list[TaskRecord]:
        """Records, oldest first; every service's when ``service`` is None."""
        prefix = self._key(service) if service else f"{self.prefix}/tasks/".encode()
        return await _read_records(self.etcd, prefix, TaskRecord)

    async def prune(self, service: str, keep: int) -> int:
        """Delete the oldest finished records of ``service`` beyond ``keep``; how many went."""
        finished = [r for r in await self.list_tasks(service) if r.state.finished]
        doomed = finished[: max(0, len(finished) - keep)]
        with _etcd_errors():
            for record in doomed:
                await self.etcd.delete(self._key(service, record.id))
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

    def _pending_key(self, delivery_id: str) -> bytes:
        return f"{self.prefix}/notifications/pending/{delivery_id}".encode()

    def _outcomes_prefix(self, service: str) -> str:
        return f"{self.prefix}/notifications/outcomes/{service}/"

    async def add(self, deliveries: list[Delivery]) -> None:
        """Queue every delivery of one event in one transaction: all or none."""
        txn = self.etcd.transactions
        with _etcd_errors():
            await self.etcd.transaction(
                compare=[],
                success=[
                    txn.put(self._pending_key(d.id), d.model_dump_json().encode())
                    for d in deliveries
                ],
                failure=[],
            )

    async def pending(self) -> list[tuple[Delivery, bytes]]:
        """Every pending delivery, with its stored value (for :meth:`replace`)."""
        with _etcd_errors():
            found = await self.etcd.get_prefix(f"{self.prefix}/notifications/pending/".encode())
        return [(Delivery.model_validate_json(kv.value), kv.value) for kv in found]

    async def replace(self, delivery: Delivery, stored: bytes) -> bytes | None:
        """Write ``delivery`` if its stored value is still ``stored`` (nobody claimed or
        finished it meanwhile): the new stored value, or None."""
        key = self._pending_key(delivery.id)
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
        base = self._outcomes_prefix(delivery.service)
        key = f"{base}{outcome.at:017.6f}-{delivery.id}".encode()
        txn = self.etcd.transactions
        with _etcd_errors():
            await self.etcd.transaction(
                compare=[],
                success=[
                    txn.delete(self._pending_key(delivery.id)),
                    txn.put(key, outcome.model_dump_json().encode()),
                ],
                failure=[],
            )
            found = await self.etcd.get_prefix(base.encode(), keys_only=True)
            keys = sorted(kv.key for kv in found)
            for old in keys[: max(0, len(keys) - self.keep)]:
                await self.etcd.delete(old)

    async def outcomes(self, service: str) -> list[DeliveryOutcome]:
        """The last outcomes of ``service``, newest first."""
        with _etcd_errors():
            found = await self.etcd.get_prefix(self._outcomes_prefix(service).encode())
        items = sorted(((kv.key, kv.value) for kv in found), reverse=True)
        return [DeliveryOutcome.model_validate_json(value) for _, value in items]
