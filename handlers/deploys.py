"""Deploys: one worker per service drives its deploys, level-triggered, to a terminal state.

What a deploy does next is decided in one place, the pure :func:`handlers.reconcile.next_step`
(its module docstring draws the state machine). This module is the part that does I/O:

- **Admission** (``DeployRequested``, on the bus lane, so the route can answer): take the
  service's lock (an etcd key on a kept-alive lease). Held by another deploy: 409 naming the
  holder, or, when the caller asked to wait (``wait_for_lock``), a ``queued`` record that the
  worker starts once the lock is free, oldest first, within the policy's ``deploy_deadline``.
  Then **plan** with the original's rules (``plan`` below: the service's current units decide
  the instance count and whether ``destroy_previous`` can be honoured; the two 400 texts are
  kept verbatim, double spaces included), keep the service's policy in the record (a policy
  change applies to the next deploy), save the record and wake the worker. Anything that goes
  wrong after the lock was taken releases it.
- **The worker** of a service: bus events (a request, an instance that became healthy), a
  timer and a periodic look at etcd for deploys nobody drives only *wake* it. Each pass reads
  the service's deploy records and what is (fleet's units and states, the instances' health
  and routing), asks ``next_step``, records the step, performs it idempotently (a unit that
  exists, a server that is not registered, a unit that is gone: none is an error) and looks
  again. A temporary error (etcd, fleet or the router not answering) is retried with capped
  backoff, and the deploy's deadlines still end it; a permanent one ends the deploy with its
  sentence (``on_permanent``).
- **Webhook pushes** are requests to the same worker, not a queue of their own: a push the
  webhooks handler queued (one slot per service in etcd) wakes it, and a pass that finds no
  unfinished deploy of the service turns the push into a queued deploy, taking it from its
  slot in the same etcd transaction (``_take_push``).
- **Ownership.** A server drives a deploy only while it holds the deploy's lock: before every
  step that changes fleet or the router it checks that the lock is still its own (same deploy,
  same lease, lease not expired). A lock whose lease is alive belongs to whoever holds it, a
  peer or a previous run of this server; once the lease is gone (its holder died), the first
  server to take the lock resumes the deploy where its record says. Two servers may share one
  etcd and fleet.

Every step also adds a progress event to the record (``DeployRecord.note``): the events
stream of the API and ``deployctl deploy --wait`` show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.errors import PermanentError, is_temporary
from deployster.etcd import LeaseKeeper
from deployster.events import (
    DeployFailed,
    DeployQueued,
    DeployRejected,
    DeployRequested,
    DeploySucceeded,
    DestroyRequested,
    InstanceHealthy,
    InstanceUnhealthy,
    InstanceWithdrawn,
    PushDecided,
    PushTaken,
    UnitsDestroyed,
    UnitsSubmitted,
)
from deployster.fleet import FleetClient, FleetConflictError, FleetError, FleetNotFoundError
from deployster.keys import announce_key
from deployster.naming import UnitName
from deployster.policy import ServicePolicy
from deployster.records import DeployRecord, DeployState, DeployStep, LockHolder
from deployster.routers import Router, RouterTimeoutError
from deployster.store import LOCK_TTL, Store
from deployster.supervise import start_supervised
from deployster.units import (
    DEFAULT_DOCKER,
    DEFAULT_ETCDCTL,
    DEFAULT_PUBLISH_ADDRESS,
    UnitContext,
    UnitTemplate,
    image_name,
    render_unit,
)
from handlers.reaper import FleetView
from handlers.reconcile import (
    ConfirmRouted,
    Destroy,
    Done,
    Finish,
    InstanceView,
    Note,
    Observed,
    Plan,
    Remove,
    Retire,
    StartRollback,
    Step,
    Submit,
    Wait,
    next_step,
    on_permanent,
)
from handlers.webhooks import deploy_of_push, read_queued

log = structlog.get_logger(__name__)

TOO_MANY_VERSIONS = (
    "Too many versions are running.  Destroying previous units is not supported when more "
    "than one version is currently running."
)
TOO_MANY_INSTANCES = (
    "A greater number of instances than what was specified is already running.  Make sure "
    "this number is less than or equal to the number already running or disable destroying "
    "previous units."
)
RETRY_INITIAL, RETRY_MAX = 0.2, 5.0  # backoff of a step that met an unreachable etcd or fleet
RESYNC = LOCK_TTL / 3  # seconds between looks for deploys nobody drives (a dead peer's)
# Seconds by which servers' clocks may disagree: a deploy record written this long before the
# fleet view's last full read may still have created units that read missed.
CLOCK_SKEW = 60.0


@dataclass(frozen=True)
class DeployConfig:
    """What a deploy needs from the server's settings."""

    image_prefix: str
    etcd_endpoints: str
    etcd_prefix: str
    # How often fleet's unit states are read while waiting (the original polled every 1 s).
    poll_interval: float = 1.0
    # Longest wait for the router to confirm a change.
    router_timeout: float = 30.0
    # What the units call, and where instances publish unless the policy says.
    docker: str = DEFAULT_DOCKER
    etcdctl: str = DEFAULT_ETCDCTL
    publish_address: str = DEFAULT_PUBLISH_ADDRESS


class DeployRejectedError(PermanentError):
    """The request cannot be honoured as asked (a 400 or 409 with this sentence)."""

    def __init__(self, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.status = status


class LockHeldError(DeployRejectedError):
    """Another deploy of the service holds its lock."""

    def __init__(self, service: str, held: LockHolder) -> None:
        super().__init__(
            f"Service {service!r} is being deployed by deploy {held.holder} "
            f"({held.reason}, by {held.actor or 'unknown'}, since {held.since:%Y-%m-%d %H:%M:%S} UTC); "
            "wait for it to finish, then deploy again.",
            status=409,
        )
        self.held = held


class LockLostError(Exception):
    """This server no longer holds the lock of the deploy it drives: it must stop touching it."""


def plan(
    request: DeployRequested, current: list[UnitName], policy_count: int = 0
) -> tuple[int, bool]:
    """Instance count and effective ``destroy_previous`` by the original's rules.

    A count in the service's policy stands in for a request that gives none.
    """
    releases = {name.release for name in current}
    wanted = request.instance_count or policy_count
    destroy_previous = request.destroy_previous
    if destroy_previous:
        if len(releases) > 1:
            raise DeployRejectedError(TOO_MANY_VERSIONS)
        if wanted and wanted < len(current):
            raise DeployRejectedError(TOO_MANY_INSTANCES)
        if not releases:
            destroy_previous = False
    if wanted:
        count = wanted
    elif len(releases) == 1:
        count = len(current)
    else:
        count = 1
    return count, destroy_previous


@dataclass(eq=False)
class _Worker:
    """One service's worker: a task that runs passes, the event that wakes it, and the
    destroy requests it takes between two steps of a deploy."""

    wake: asyncio.Event
    task: asyncio.Task[None] | None = None
    destroys: list[DestroyRequested] = field(default_factory=list)


class Instances(Protocol):
    """The announced instances as deploys read and retire them (the server passes its
    instances handler)."""

    def view(self, unit: UnitName) -> InstanceView | None: ...

    async def retire(self, units: list[UnitName]) -> list[str]: ...

    def claim(self, service: str) -> None:
        """This server drives a deploy of ``service``: probe it here, whoever owns it."""

    def release(self, service: str) -> None: ...


class DeployHandler:
    def __init__(
        self,
        bus: EventBus,
        *,
        fleet: FleetClient,
        view: FleetView,
        store: Store,
        template: UnitTemplate,
        config: DeployConfig,
        router: Router,
        instances: Instances,
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.view = view
        self.store = store
        self.template = template
        self.config = config
        self.router = router
        self.instances = instances
        self._keepers: dict[str, LeaseKeeper] = {}  # deploy id -> the lease of its lock
        self._workers: dict[str, _Worker] = {}
        self._resync: asyncio.Task[None] | None = None
        self._failed_read: dict[str, tuple[float, dict[str, str]]] = {}  # fleet states cache
        # service -> a push whose take etcd did not confirm, and the deploy it would start
        self._unconfirmed: dict[str, PushTaken] = {}

    def register(self) -> None:
        self.bus.subscribe(DeployRequested, self.on_requested)
        self.bus.subscribe(DestroyRequested, self.on_destroy_requested)
        self.bus.subscribe(InstanceHealthy, self._on_instance)
        self.bus.subscribe(InstanceUnhealthy, self._on_instance)
        self.bus.subscribe(InstanceWithdrawn, self._on_instance)
        self.bus.subscribe(PushDecided, self._on_push)

    async def resume(self) -> int:
        """Wake the worker of every service with an unfinished deploy (each resumes a deploy
        only once its lock is free), and keep looking for such deploys every few seconds, so
        that a dead peer's deploys are taken over; returns how many deploys are unfinished.
        Records written before the index of unfinished deploys existed are indexed first
        (once per etcd prefix)."""
        await self.store.index_unfinished()
        unfinished = await self._unfinished_services()
        if self._resync is None:
            self._resync = start_supervised("deploys-resync", self._resync_loop)
        return sum(unfinished.values())

    async def close(self) -> None:
        """Stop the workers, then hand their locks over: revoked, so that the next server to
        start (or a peer) resumes their deploys at once; a lease etcd cannot revoke now
        expires within ``LOCK_TTL``."""
        await cancel_and_wait(self._resync, *(w.task for w in self._workers.values()))
        for keeper in self._keepers.values():
            with contextlib.suppress(Exception):
                await keeper.revoke()
        self._keepers.clear()

    def wake(self, service: str) -> None:
        worker = self._workers.get(service)
        if worker is None:
            worker = self._workers[service] = _Worker(asyncio.Event())
            worker.task = start_supervised(
                f"deploys:{service}", lambda: self._work(service, worker), service=service
            )
        worker.wake.set()

    async def _on_instance(
        self, event: InstanceHealthy | InstanceUnhealthy | InstanceWithdrawn
    ) -> None:
        if event.service in self._workers:
            self._workers[event.service].wake.set()

    async def _on_push(self, event: PushDecided) -> None:
        if event.decision == "queued":
            self.wake(event.service)

    async def _unfinished_services(self) -> dict[str, int]:
        """Wake the worker of every service with an unfinished deploy or a queued push;
        returns the unfinished deploys by service. Reads the index of unfinished deploys and
        their records only, never every record."""
        unfinished = await self.store.unfinished_deploys()
        counts = {service: len(ids) for service, ids in unfinished.items()}
        for service in {*counts, *await self.store.queued_services()}:
            self.wake(service)
        return counts

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(RESYNC)
            try:
                await self._unfinished_services()
            except Exception as exc:
                if not is_temporary(exc):
                    raise
                log.warning("deploys_resync_skipped", reason=str(exc))

    # -- admission (the bus lane: the route waits for its outcome) -----------------------

    async def on_requested(self, event: DeployRequested) -> None:
        record = DeployRecord.from_request(
            event, event.instance_count, event.destroy_previous, ServicePolicy()
        )
        taken = await self._take_lock(record)
        if isinstance(taken, LockHolder):
            await self._refuse(event, record, taken)
            return
        try:
            records = await self.store.list_deploys(record.service)
            running = self._running(record, records)
            if running is not None:
                await self._unlock(record)
                await self._refuse(event, record, running)
                return
            record = await self.store.save_deploy(await self._plan(record, records))
        except DeployRejectedError as exc:
            await self._unlock(record)
            self._reject(event, exc)
            return
        except Exception as exc:
            # Nothing was submitted: the lock goes, and the route answers with the reason.
            await self._unlock(record)
            reason = exc.message if isinstance(exc, FleetError) else str(exc)
            if is_temporary(exc) or isinstance(exc, PermanentError):
                log.warning("deploy_not_started", reason=reason)
            else:
                log.exception("deploy_not_started")
            self.bus.publish(
                DeployFailed(service=event.service, deploy_id=event.deploy_id, reason=reason)
            )
            return
        self.wake(record.service)

    @staticmethod
    def _running(record: DeployRecord, records: list[DeployRecord]) -> LockHolder | None:
        """The service's unfinished deploy that is past its queue, if any: its lock may be
        free for a moment (its lease expired while etcd was away, and its worker has not
        taken it again yet), but it still runs, and a second deploy must not start beside it."""
        for other in records:
            if (
                other.id != record.id
                and not other.state.finished
                and other.step is not DeployStep.QUEUED
            ):
                return LockHolder(
                    holder=other.id,
                    actor=other.actor,
                    reason=f"deploy of {other.version}",
                    since=other.created_at,
                    lease=0,
                )
        return None

    async def _refuse(self, event: DeployRequested, record: DeployRecord, held: LockHolder) -> None:
        if event.wait_for_lock:
            await self._queue(record, held)
        else:
            self._reject(event, LockHeldError(event.service, held))

    def _reject(self, event: DeployRequested, exc: DeployRejectedError) -> None:
        log.info("deploy_rejected", reason=str(exc))
        self.bus.publish(
            DeployRejected(
                service=event.service,
                deploy_id=event.deploy_id,
                description=str(exc),
                status=exc.status,
            )
        )

    async def _queue(self, record: DeployRecord, held: LockHolder) -> None:
        """Record the deploy as queued behind the lock's holder; the worker starts it."""
        record.step = DeployStep.QUEUED
        record.policy = await self.store.get_policy(record.service)  # its deadline bounds the wait
        record.note("queued", f"waiting for deploy {held.holder} ({held.reason}) to finish")
        record = await self.store.save_deploy(record)
        log.info("deploy_queued", behind=held.holder)
        self.bus.publish(
            DeployQueued(service=record.service, deploy_id=record.id, behind=held.holder)
        )
        self.wake(record.service)

    async def _current_units(self, service: str, records: list[DeployRecord]) -> list[UnitName]:
        """The service's units as fleet has them now, in fleet's order: exact, read through
        to fleet unit by unit (``GET /units/{name}``), not by listing the whole fleet. The
        names asked for are the view's units of the service and the units of its deploys
        (``records``, any server's) that were unfinished or changed since the view's last full
        read; a view never filled does a full read first. A unit someone created by hand since
        the last full read is not seen. FleetError when fleet does not answer."""
        await self.view.ensure(self.fleet)
        since = (self.view.observed_at or 0.0) - CLOCK_SKEW
        names = [str(name) for name, _ in self.view.units_of(service)]
        for record in records:
            if not record.state.finished or record.updated_at.timestamp() >= since:
                names += record.units
        found = await self.view.read_through(self.fleet, names)
        return [
            n for n in map(UnitName.parse, sorted(found)) if n is not None and n.service == service
        ]

    async def _plan(self, record: DeployRecord, records: list[DeployRecord]) -> DeployRecord:
        """Fill in the policy, the instance count, the units and the units they replace; the
        caller holds the service's lock, so what runs cannot change meanwhile.

        ``record.instance_count`` and ``destroy_previous`` are what was asked for; the
        returned record has what will be done, at step ``submitting``. ``records`` are the
        service's deploys. Raises DeployRejectedError for the original's 400s, FleetError when
        fleet cannot say what runs.
        """
        policy = await self.store.get_policy(record.service)
        current = await self._current_units(record.service, records)
        asked = DeployRequested(
            service=record.service,
            deploy_id=record.id,
            version=record.version,
            timestamp=record.timestamp,
            instance_count=record.instance_count,
            destroy_previous=record.destroy_previous,
        )
        count, destroy_previous = plan(asked, current, policy.instance_count)
        record = record.model_copy(
            update={
                "policy": policy,
                "instance_count": count,
                "destroy_previous": destroy_previous,
                "step": DeployStep.SUBMITTING,
                "units": [
                    str(UnitName.build(record.service, record.version, record.timestamp, n))
                    for n in range(1, count + 1)
                ],
                "previous_units": [str(name) for name in current] if destroy_previous else [],
            }
        )
        replacing = (
            f"replacing {len(record.previous_units)} previous unit(s)"
            if destroy_previous
            else "keeping the previous units"
        )
        record.note("planned", f"{count} instance(s) of {record.version}, {replacing}")
        log.info(
            "deploy_planned",
            version=record.version,
            instances=count,
            destroy_previous=destroy_previous,
        )
        return record

    # -- locks ----------------------------------------------------------------------------

    async def _take_lock(self, record: DeployRecord) -> LeaseKeeper | LockHolder:
        """Take the service's lock for ``record`` on a new lease: the keeper, or who holds it."""
        taken = await self.store.locks.take(
            record.service,
            record.id,
            actor=record.actor,
            reason=f"deploy of {record.version}",
            ttl=LOCK_TTL,
        )
        if isinstance(taken, LeaseKeeper):
            self._keepers[record.id] = taken
            self.instances.claim(record.service)  # the deploy reads this server's probes
            if not record.started_at:
                record.started_at = time.time()
        return taken

    async def _owned(self, record: DeployRecord) -> bool:
        """True while this server holds ``record``'s lock: same deploy, same lease, the lease
        not expired. A lock found lost is let go of here."""
        keeper = self._keepers.get(record.id)
        if keeper is None:
            return False
        holder = await self.store.locks.holder(record.service)
        if (
            not keeper.expired.is_set()
            and holder is not None
            and holder.holder == record.id
            and holder.lease == keeper.lease_id
        ):
            return True
        log.warning(
            "deploy_lock_lost",
            deploy_id=record.id,
            holder=holder.holder if holder else None,
            lease_expired=keeper.expired.is_set(),
        )
        del self._keepers[record.id]
        self.instances.release(record.service)
        await keeper.stop()
        return False

    async def _check_owned(self, record: DeployRecord) -> None:
        """Before a step that changes fleet or the router: stop unless the lock is ours."""
        if not await self._owned(record):
            raise LockLostError(record.id)

    async def _unlock(self, record: DeployRecord) -> None:
        """Release ``record``'s lock. Best effort: a lock etcd cannot delete now goes with its
        lease, which is no longer kept alive."""
        keeper = self._keepers.pop(record.id, None)
        if keeper is not None:
            self.instances.release(record.service)
            await keeper.stop()
        try:
            await self.store.locks.release(record.service, record.id)
            if keeper is not None:
                await keeper.revoke()
        except Exception as exc:
            if not is_temporary(exc):
                raise
            log.warning("deploy_lock_left_to_expire", reason=str(exc), ttl=LOCK_TTL)

    # -- the worker ---------------------------------------------------------------------

    async def _work(self, service: str, worker: _Worker) -> None:
        """Passes until cancelled: woken by events, by its own requeue delay, or by the
        periodic resync; a temporary error is retried with capped backoff."""
        backoff = RETRY_INITIAL
        while True:
            worker.wake.clear()
            while worker.destroys:
                await self._destroy_version(worker.destroys.pop(0))
            try:
                delay = await self._pass(service)
                backoff = RETRY_INITIAL
            except Exception as exc:
                if not is_temporary(exc):
                    raise  # a bug: the supervisor logs it and starts the worker again
                log.warning("deploy_step_retrying", reason=str(exc), retry_in=backoff)
                # An instance routed again (etcd is back) or a request ends the wait early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.wake.wait(), backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            if delay is None:
                await worker.wake.wait()
            elif delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.wake.wait(), delay)

    async def _pass(self, service: str) -> float | None:
        """One look at the service and one step; the delay until the next look (None: idle
        until woken)."""
        records = await self.store.list_deploys(service)
        taken = self._unconfirmed.get(service)
        if taken is not None and any(r.id == taken.deploy_id for r in records):
            del self._unconfirmed[service]
            self.bus.publish(taken)  # etcd took it after all, though its answer was lost
        for record in records:
            if record.state.finished and record.id in self._keepers:
                await self._finished(record)  # its finish was cut short after the save
        unfinished = [r for r in records if not r.state.finished]
        if not unfinished:
            return await self._take_push(service, records)
        active = next((r for r in unfinished if r.step is not DeployStep.QUEUED), None)
        queued = [r for r in unfinished if r.step is DeployStep.QUEUED]
        delays = []
        if active is not None:
            with structlog.contextvars.bound_contextvars(deploy_id=active.id):
                if await self._owned(active) or await self._adopt(active):
                    delays.append(await self._drive(active, await self._observe(active)))
                else:
                    delays.append(RESYNC)  # a live peer's (or an earlier run's) lease
        free = bool(queued) and active is None and await self.store.locks.holder(service) is None
        for n, record in enumerate(queued):
            with structlog.contextvars.bound_contextvars(deploy_id=record.id):
                observed = Observed(now=time.time(), may_start=free and n == 0)
                delays.append(await self._drive(record, observed))
        return min(delays)

    async def _take_push(self, service: str, records: list[DeployRecord]) -> float | None:
        """No deploy of the service is unfinished: the queued push, if any, becomes a queued
        deploy, in one etcd transaction with taking it from its slot (at the revision read, so
        that of several servers one takes it, and a newer push is never lost). Garbage in the
        slot is dropped. None when there is no push; else 0: look again at once."""
        slot = await self.store.queued_push(service)
        if slot is None:
            return None
        push = read_queued(slot)
        if push is None:
            if await self.store.take_queued_push(slot):
                log.warning("webhook_push_unreadable", reason="not a push of this service: dropped")
            return 0.0
        with structlog.contextvars.bound_contextvars(event_id=push.event_id, tag=push.tag):
            wanted = deploy_of_push(push, await self.store.get_policy(service), records)
            if isinstance(wanted, str):
                if await self.store.take_queued_push(slot):
                    self.bus.publish(PushTaken(service=service, push=push, reason=wanted))
                return 0.0
            callback = slot.value if push.callback_url else ""
            taken = PushTaken(service=service, push=push, deploy_id=wanted.id)
            # Kept while etcd's answer is unknown (an error may come after etcd took it): a
            # later pass that finds the deploy reports it.
            self._unconfirmed[service] = taken
            done = await self.store.take_queued_push(slot, wanted, callback)
            del self._unconfirmed[service]
            if done:
                log.info("webhook_push_taken", deploy_id=wanted.id)
                self.bus.publish(taken)
            return 0.0

    async def _adopt(self, record: DeployRecord) -> bool:
        """Take over a deploy nobody drives: its lock is free once its holder's lease is gone."""
        if await self.store.locks.holder(record.service) is not None:
            return False
        if isinstance(await self._take_lock(record), LockHolder):
            return False
        log.info("deploy_resumed", state=record.state, step=record.step)
        record.note("resumed", f"a server resumes the deploy at step {record.step}")
        await self.store.save_deploy(record)
        return True

    async def _observe(self, record: DeployRecord) -> Observed:
        """What is, for the step ``record`` is at."""
        now = time.time()
        units: frozenset[str] = frozenset()
        failed: dict[str, str] = {}
        if record.step in (DeployStep.SWITCHING, DeployStep.ROLLING_BACK):
            # Exact: `succeeded` and `rolled_back` need fleet to confirm these units gone.
            doomed = record.previous_units if record.step is DeployStep.SWITCHING else record.units
            units = frozenset(await self.view.read_through(self.fleet, doomed))
        if record.step is DeployStep.WAITING:
            failed = await self._failed_units(record)
        instances = {}
        for unit in record.units:
            name = UnitName.parse(unit)
            view = self.instances.view(name) if name is not None else None
            if view is not None:
                instances[unit] = view
        return Observed(now=now, fleet_units=units, failed=failed, instances=instances)

    async def _failed_units(self, record: DeployRecord) -> dict[str, str]:
        """The deploy's units that systemd reports failed, read from fleet (their states, unit
        by unit) at most every ``poll_interval``; while fleet does not answer, none is taken
        for failed."""
        read_at, failed = self._failed_read.get(record.id, (0.0, {}))
        if time.monotonic() - read_at < self.config.poll_interval:
            return failed
        try:
            states = await self.view.read_states(self.fleet, record.units)
        except FleetError as exc:
            if not is_temporary(exc):
                raise
            log.warning("fleet_state_unavailable", reason=exc.message)
            return failed
        # A unit that failed is described once, its last log lines included.
        failed = {
            s.name: failed.get(s.name) or await self.fleet.describe_failure(s)
            for s in states
            if s.active_state == "failed"
        }
        self._failed_read[record.id] = (time.monotonic(), failed)
        return failed

    async def _drive(self, record: DeployRecord, observed: Observed) -> float:
        """Perform the step ``next_step`` picks; a permanent error leads where
        ``on_permanent`` says. Returns the delay until the next look."""
        step = next_step(record, observed)
        try:
            return await self._perform(record, step)
        except LockLostError:
            return RESYNC
        except Exception as exc:
            if is_temporary(exc):
                raise
            if isinstance(exc, PermanentError):
                sentence = exc.message if isinstance(exc, FleetError) else str(exc)
                log.warning("deploy_step_failed", step=type(step).__name__, reason=sentence)
            else:
                sentence = f"Deployster failed at step {record.step}: {exc!r}"
                log.exception("deploy_step_crashed", step=type(step).__name__)
            return await self._perform(record, on_permanent(record, sentence))

    async def _perform(self, record: DeployRecord, step: Step) -> float:
        match step:
            case Done():
                return 0.0
            case Wait(delay=delay, notes=notes):
                if notes:
                    self._note_all(record, notes)
                    await self.store.save_deploy(record)
                return delay
            case Plan():
                await self._start_queued(record)
            case Submit(units=units):
                await self._submit(record, units)
            case ConfirmRouted(urls=urls, notes=notes):
                await self._confirm_routed(record, urls, notes)
            case StartRollback(reason=reason, notes=notes):
                self._note_all(record, notes)
                record.step, record.error = DeployStep.ROLLING_BACK, reason
                record.note("rolling_back", reason)
                await self.store.save_deploy(record)
                log.warning("deploy_rolling_back", reason=reason)
            case Retire(units=units):
                await self._check_owned(record)
                retired = await self._deregister(record.service, units)
                record.note(
                    "retiring",
                    f"{len(retired)} previous instance(s) out of the router; "
                    f"draining for {record.policy.drain:g} s",
                )
                await self.store.save_deploy(record)
            case Destroy(units=units):
                await self._check_owned(record)
                await self._destroy_each(units)
                log.info("previous_units_destroyed", units=list(units))
            case Remove(units=units):
                await self._check_owned(record)
                await self._deregister(record.service, units)
                await self._destroy_each(units)
            case Finish(state=state, error=error, notes=notes):
                self._note_all(record, notes)
                await self._finish(record, state, error)
        return 0.0

    @staticmethod
    def _note_all(record: DeployRecord, notes: tuple[Note, ...]) -> None:
        for kind, message, unit in notes:
            record.note(kind, message, unit=unit)

    async def _start_queued(self, record: DeployRecord) -> None:
        """A queued deploy's turn: take the lock, plan (the service changed while it waited)."""
        if isinstance(await self._take_lock(record), LockHolder):
            return  # another deploy took it first: still queued
        records = await self.store.list_deploys(record.service)
        await self.store.save_deploy(await self._plan(record, records))

    async def _submit(self, record: DeployRecord, units: tuple[str, ...]) -> None:
        await self._check_owned(record)
        created: list[str] = []
        try:
            for unit in units:
                name = UnitName.parse(unit)
                assert name is not None
                options = render_unit(self.template, self._context(name, record))
                # A conflict: submitted before a retry or a restart, same name, same options.
                with contextlib.suppress(FleetConflictError):
                    await self.fleet.create_unit(unit, options)
                created.append(unit)
            for unit in units:
                await self.fleet.set_desired_state(unit, "launched")
        except Exception as exc:
            if is_temporary(exc):
                raise  # retried: every unit is submitted again, idempotently
            with contextlib.suppress(Exception):
                await self._destroy_each(created)
            if isinstance(exc, FleetError):
                raise DeployRejectedError(f"fleet refused the units: {exc.message}") from exc
            raise
        record.state, record.step = DeployState.RUNNING, DeployStep.WAITING
        record.submitted_at = time.time()
        record.note("submitted", f"fleet accepted {len(units)} unit(s): {', '.join(units)}")
        await self.store.save_deploy(record)
        log.info("units_submitted", units=list(units))
        self.bus.publish(
            UnitsSubmitted(service=record.service, deploy_id=record.id, units=list(units))
        )
        await self._show_in_view(units)

    async def _confirm_routed(
        self, record: DeployRecord, urls: tuple[str, ...], notes: tuple[Note, ...]
    ) -> None:
        if notes:
            self._note_all(record, notes)
            await self.store.save_deploy(record)
        await self.router.wait_applied(
            record.service, present=urls, timeout=self.config.router_timeout
        )
        log.info("release_healthy", urls=list(urls))
        record.note("routed", f"the router sends traffic to all {len(urls)} new instance(s)")
        if record.destroy_previous:
            record.step = DeployStep.SWITCHING
            await self.store.save_deploy(record)
        else:
            await self._finish(record, DeployState.SUCCEEDED)

    async def _show_in_view(self, units: Iterable[str]) -> None:
        """Read these units through to fleet, so that the fleet view shows them now rather
        than after the next full read; best effort (the next pass reads them anyway)."""
        try:
            await self.view.read_through(self.fleet, units)
        except FleetError as exc:
            log.warning("fleet_view_not_updated", reason=exc.message)

    async def _finish(
        self, record: DeployRecord, state: DeployState, error: str | None = None
    ) -> None:
        # The deploy's units as they end up (a deploy taken over from a peer: submitted there).
        await self._show_in_view(record.units)
        record.state, record.step, record.error = state, DeployStep.DONE, error
        summary = (
            f"{record.version} is live with {len(record.units)} instance(s)"
            if state is DeployState.SUCCEEDED
            else error or str(state)
        )
        record.note(str(state), summary)
        await self.store.save_deploy(record)
        await self._finished(record)

    async def _finished(self, record: DeployRecord) -> None:
        """After a finished record was saved: let go of the lock and tell the bus. A pass
        comes here again for a finished record whose lock this server still holds (etcd
        wrote the record, but its answer was lost)."""
        state, error = record.state, record.error
        self._failed_read.pop(record.id, None)
        await self._unlock(record)
        log.info("deploy_finished", state=state, error=error)
        duration = time.time() - record.created_at.timestamp()
        if state is DeployState.SUCCEEDED:
            self.bus.publish(
                DeploySucceeded(service=record.service, deploy_id=record.id, duration=duration)
            )
        else:
            self.bus.publish(
                DeployFailed(
                    service=record.service,
                    deploy_id=record.id,
                    reason=error or state,
                    state=state,
                    duration=duration,
                )
            )

    # -- fleet and router, idempotent ----------------------------------------------------

    async def _deregister(self, service: str, units: tuple[str, ...] | list[str]) -> list[str]:
        """Take units out of the router and wait until it applied that (RouterTimeoutError, a
        temporary error, otherwise); returns the URLs they were routed at."""
        names = [n for n in map(UnitName.parse, units) if n is not None]
        if not names:
            return []
        urls = await self.instances.retire(names)
        # A retry (the router did not confirm in time) finds their keys gone already: it
        # still waits until the router stops serving the instances' own URLs.
        for name in names:
            instance = self.instances.view(name)
            if instance is not None and instance.url not in urls:
                urls.append(instance.url)
        await self.router.wait_applied(service, absent=urls, timeout=self.config.router_timeout)
        return urls

    async def _destroy_each(self, units: tuple[str, ...] | list[str]) -> None:
        """Destroy every unit; the first error is raised once every unit was tried."""
        first: FleetError | None = None
        for unit in units:
            try:
                await self.fleet.destroy_unit(unit)
                self.view.forget([unit])
            except FleetNotFoundError:
                self.view.forget([unit])  # already gone: the goal is reached
            except FleetError as exc:
                log.warning("unit_destroy_failed", unit=unit, reason=exc.message)
                first = first or exc
        if first is not None:
            raise first

    async def on_destroy_requested(self, event: DestroyRequested) -> None:
        """A request to the service's worker, which answers with ``UnitsDestroyed``: never
        in the middle of a deploy's step."""
        self.wake(event.service)
        worker = self._workers[event.service]
        worker.destroys.append(event)
        worker.wake.set()

    async def _destroy_version(self, event: DestroyRequested) -> None:
        destroyed: list[str] = []
        failures: dict[str, str] = {}
        try:
            records = await self.store.list_deploys(event.service)
        except Exception as exc:
            if not is_temporary(exc):
                raise
            # The fleet view's units of the service are still read through.
            log.warning("deploy_records_unavailable", reason=str(exc))
            records = []
        try:
            current = await self._current_units(event.service, records)
        except FleetError as exc:
            failures["*"] = exc.message
            current = []
        matching = [
            str(n)
            for n in current
            if n.version == event.version
            and (not event.timestamp or n.timestamp == event.timestamp)
        ]
        try:
            await self._deregister(event.service, matching)
        except RouterTimeoutError as exc:
            log.warning("router_not_confirmed", reason=str(exc))
        except Exception as exc:  # the router's etcd: destroying now would cut live traffic
            if not is_temporary(exc):
                log.exception("units_not_deregistered")
            failures["*"] = f"the router could not be updated first: {exc}"
            matching = []
        for name in matching:
            try:
                await self._destroy_each([name])
                destroyed.append(name)
            except FleetError as exc:
                failures[name] = exc.message
        log.info("units_destroyed", version=event.version, units=destroyed, failures=failures)
        self.bus.publish(
            UnitsDestroyed(
                service=event.service,
                request_id=event.request_id,
                units=destroyed,
                failures=failures,
            )
        )

    def _context(self, name: UnitName, record: DeployRecord) -> UnitContext:
        return UnitContext(
            unit=name,
            image=image_name(self.config.image_prefix, name.service, name.version),
            env=record.env,
            etcd_endpoints=self.config.etcd_endpoints,
            announce_key=announce_key(self.config.etcd_prefix, name),
            container_port=record.policy.container_port,
            pull_policy=record.policy.pull_policy,
            publish_address=record.policy.publish_address or self.config.publish_address,
            docker=self.config.docker,
            etcdctl=self.config.etcdctl,
        )
