"""Instances: announcements in etcd -> health probes -> router registration.

A unit announces its instance under ``<prefix>/instances/<svc>/<version>:<timestamp>/<n>``
once it listens (the docker template's ExecStartPost, or the test workload itself). This
handler follows that prefix with the resumable watch (an etcd restart or a compaction loses
nothing: the watch resyncs), probes every announced instance over HTTP with the service's
policy, and:

- registers an instance with the router when it becomes healthy (``InstanceHealthy``),
- deregisters it when it stops answering (``InstanceUnhealthy``) and registers it again when
  it recovers, because probing never stops while the instance is announced,
- deregisters it when the announcement goes away (``InstanceWithdrawn``).

Probing is one scheduler, not a task per instance (a task with its frames and log context
costs kilobytes, times 10,000 instances): a heap of due times, at most ``MAX_IN_FLIGHT``
probes at once (a probe is a short-lived task), and each instance's probing state (its health
policy, threshold counters, pending transition) in its :class:`Instance`. An instance's next
probe is due one interval after its last one started; a probe target that hangs holds one
slot until the policy's timeout, never the others.

Faults are normal here. Probing never waits for etcd: the health policy is read once per
service when an instance's probing starts (one read for all the instances starting at once),
the one last read stands in while etcd is unreachable, and a router write that fails (the
router's keys live in etcd) is kept as the instance's pending transition and tried again
after every probe, so an instance that stops answering leaves the router as soon as the
router can be written, and a healthy one is routed as soon as etcd is back. A withdrawn
instance's deregistration is retried until it succeeds. The watch and the scheduler run
supervised; a probe that crashes is logged as a crashed task and its instance probed afresh
(its policy read again, its counters reset) after the supervisor's backoff.

With several servers, each service is probed and routed by its owner (``handlers/owners.py``:
one live server by rendezvous hashing, or the server driving a deploy of it). Every server
still follows every announcement, so when ownership moves (a peer died, joined or left, a
deploy began or ended) the probing of newly owned services starts at once and that of
services no longer owned stops a moment later, leaving the router as it is: the new owner
carries on from what it probes. Only the services whose ownership can have changed are looked
at (a deploy's claim or release: its service; a change of members: all). A server that
takes over an instance does not know whether it is routed, so an instance found unhealthy is
always deregistered (a deregistration of a server the router does not hold changes nothing).

The deploy state machine reads the live view (:meth:`InstancesHandler.get`) to decide when a
new release is healthy and routed, and *retires* instances it is replacing or rolling back, so
that a late successful probe never puts them back into rotation.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import aetcd
import aiohttp
import structlog

from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.errors import is_temporary
from deployster.etcd import WatchEvent, watch_prefix
from deployster.events import InstanceHealthy, InstanceUnhealthy, InstanceWithdrawn
from deployster.health import HealthTracker, ProbeResult, Transition, probe
from deployster.keys import instances_prefix, parse_announce_key
from deployster.metrics import Metrics
from deployster.naming import UnitName
from deployster.policy import HealthPolicy
from deployster.routers import Router
from deployster.store import Store
from deployster.supervise import BACKOFF_INITIAL, BACKOFF_MAX, start_supervised
from deployster.units import Announcement
from handlers.owners import HANDOVER_GRACE, Owners
from handlers.reconcile import InstanceView

log = structlog.get_logger(__name__)

MAX_IN_FLIGHT = 100  # probes at once: aiohttp's connector holds as many connections
POLICY_RETRY = 1.0  # seconds until a service's policy, never read yet, is asked for again


@dataclass(slots=True)
class Instance:
    """What is known of one announced instance right now, and its probing state (slots: one
    per instance, 10,000 in a big fleet)."""

    unit: UnitName
    url: str
    machine: str
    healthy: bool = False
    healthy_since: float | None = None  # monotonic time of the last healthy transition
    announced_at: float = field(default_factory=time.time)  # epoch seconds this process saw it
    routed: bool = False
    last_probe: ProbeResult | None = None
    probed: bool = False  # this server probes it (it owns the service)
    unowned_since: float | None = None  # monotonic time this server stopped owning it
    # Probing, while ``probed``: the health policy read when it began (None: not read yet),
    # the threshold counters, a transition the router has not taken yet, the heap entry that
    # is its next probe (0: none), the probe in flight, and the crashes in a row.
    check: HealthPolicy | None = field(default=None, repr=False)
    tracker: HealthTracker | None = field(default=None, repr=False)
    pending: Transition | None = None
    queued: int = field(default=0, repr=False)
    probe_task: asyncio.Task[None] | None = field(default=None, repr=False)
    crashes: int = 0

    @property
    def server_id(self) -> str:
        return self.unit.container

    def describe_last_probe(self) -> str:
        if not self.probed:
            return "not probed by this server: another server owns the service"
        return self.last_probe.detail if self.last_probe else "no probe has answered yet"

    def forget_probing(self) -> None:
        """Start over: the policy is read again, the counters begin at zero."""
        self.check, self.tracker, self.pending = None, None, None


class InstancesHandler:
    def __init__(
        self,
        bus: EventBus,
        *,
        etcd: aetcd.Client,
        store: Store,
        router: Router,
        prefix: str,
        metrics: Metrics | None = None,
        owners: Owners | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.bus = bus
        self.etcd = etcd
        self.store = store
        self.router = router
        self.prefix = prefix
        self.metrics = metrics
        self.owners = owners  # None: this server alone, it owns every service
        self.max_in_flight = max_in_flight
        if owners is not None:
            owners.subscribe(self._rebalance)
        self._instances: dict[UnitName, Instance] = {}
        self._by_service: dict[str, dict[UnitName, Instance]] = {}
        self._retired: set[UnitName] = set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._checks: dict[str, HealthPolicy] = {}  # the last one read, for etcd outages
        self._reading: dict[str, asyncio.Task[HealthPolicy]] = {}  # policy reads under way
        self._deregistering: set[asyncio.Task[None]] = set()
        self._synced = asyncio.Event()  # the announcements were read once
        self._handover: asyncio.TimerHandle | None = None  # the next look at unowned probing
        self._handing_over: set[str] = set()  # services probed on for the grace
        # The scheduler: (due, entry, instance), the earliest first; an entry is the
        # instance's next probe while it equals ``Instance.queued``, else it is skipped.
        self._due: list[tuple[float, int, Instance]] = []
        self._entries = itertools.count(1)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()  # something is due earlier, or a probe ended
        self._scheduler: asyncio.Task[None] | None = None

    # -- the live view the deploy state machine reads -----------------------------------

    def get(self, unit: UnitName) -> Instance | None:
        return self._instances.get(unit)

    def view(self, unit: UnitName) -> InstanceView | None:
        """The instance as a deploy's next step is decided on; None: not announced."""
        instance = self._instances.get(unit)
        if instance is None:
            return None
        since = instance.healthy_since
        return InstanceView(
            url=instance.url,
            healthy_for=None if since is None else time.monotonic() - since,
            routed=instance.routed,
            last_probe=instance.describe_last_probe(),
        )

    async def retire(self, units: list[UnitName]) -> list[str]:
        """Take these out of the router and never route them again (they are being replaced
        or rolled back); returns the URLs they were routed at, for the caller to wait on.

        The router's own keys are the truth here, not this process's memory: after a restart
        an old instance may still be registered before it was probed again.
        """
        self._retired.update(units)
        urls = []
        for service in {u.service for u in units}:
            registered = await self.router.servers(service)
            for unit in (u for u in units if u.service == service):
                if unit.container in registered:
                    await self.router.deregister(service, unit.container)
                    urls.append(registered[unit.container])
                instance = self._instances.get(unit)
                if instance is not None:
                    instance.routed = False
        return urls

    def of_service(self, service: str) -> list[Instance]:
        return list(self._by_service.get(service, {}).values())

    def owns(self, service: str) -> bool:
        return self.owners is None or self.owners.owns(service)

    def claim(self, service: str) -> None:
        """A deploy of ``service`` is driven here: probe it, whoever owns it (until
        :meth:`release`), since the deploy reads this live view."""
        if self.owners is not None:
            self.owners.claim(service)

    def release(self, service: str) -> None:
        if self.owners is not None:
            self.owners.release(service)

    def owned_services(self) -> int:
        """How many announced services this server probes now."""
        return sum(1 for s in self._by_service if self.owns(s))

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, wait: float = 5.0) -> None:
        """Follow the announcements and probe; return once they were read and the probing of
        the owned services began (or after ``wait`` seconds, the watch going on)."""
        self._session = aiohttp.ClientSession()
        self._scheduler = start_supervised("probes", self._run_probes)
        self._task = start_supervised(
            "instances-watch",
            lambda: watch_prefix(
                self.etcd, instances_prefix(self.prefix), self._on_event, self._on_resync
            ),
        )
        try:
            await asyncio.wait_for(self._synced.wait(), wait)
        except TimeoutError:
            log.warning("announcements_unread", wait=wait)

    async def close(self) -> None:
        if self._handover is not None:
            self._handover.cancel()
        await cancel_and_wait(
            self._task,
            self._scheduler,
            *self._in_flight,
            *self._reading.values(),
            *self._deregistering,
        )
        if self._session is not None:
            await self._session.close()

    # -- watch callbacks -----------------------------------------------------------------

    async def _on_event(self, event: WatchEvent) -> None:
        unit = parse_announce_key(self.prefix, event.key)
        if unit is None:
            return
        if event.kind == "delete" or event.value is None:
            await self._withdraw(unit)
        else:
            await self._announce(unit, event.value)

    async def _on_resync(self, snapshot: dict[str, str], revision: int) -> None:
        announced = {}
        for key, value in snapshot.items():
            unit = parse_announce_key(self.prefix, key)
            if unit is not None:
                announced[unit] = value
        for unit in list(self._instances):
            if unit not in announced:
                await self._withdraw(unit)
        for unit, value in announced.items():
            await self._announce(unit, value)
        self._synced.set()

    async def _announce(self, unit: UnitName, value: str) -> None:
        try:
            announcement = Announcement.model_validate_json(value)
        except ValueError:
            log.warning("announcement_invalid", service=unit.service, unit=str(unit))
            return
        current = self._instances.get(unit)
        if current is not None and current.url == announcement.url:
            return
        if current is not None:
            await self._withdraw(unit)
        instance = Instance(unit=unit, url=announcement.url, machine=announcement.machine)
        self._instances[unit] = instance
        self._by_service.setdefault(unit.service, {})[unit] = instance
        if self.owns(unit.service):
            self._start_probing(instance)
        log.info("instance_announced", service=unit.service, unit=str(unit), url=instance.url)

    def _rebalance(self, services: Collection[str] | None = None) -> None:
        """Ownership of ``services`` (None: of any service) may have changed: probe what is
        owned now at once; stop probing the rest once it has not been owned for
        ``HANDOVER_GRACE`` seconds (the new owner probes by then, and a change undone
        meanwhile, such as a lock seen before its claim, changes nothing). Stopped probing
        leaves the router alone (the new owner takes it from there) and forgets what it saw,
        so nothing here reads its stale health."""
        now = time.monotonic()
        started, stopped, due = set(), set(), None
        for service in list(self._by_service if services is None else services):
            instances = self._by_service.get(service, {})
            owned = self.owns(service)
            for instance in instances.values():
                if owned:
                    instance.unowned_since = None
                    if not instance.probed:
                        self._start_probing(instance)
                        started.add(service)
                elif instance.probed:
                    if instance.unowned_since is None:
                        instance.unowned_since = now
                    if now - instance.unowned_since < HANDOVER_GRACE:
                        at = instance.unowned_since + HANDOVER_GRACE
                        due = at if due is None else min(due, at)
                        self._handing_over.add(service)
                        continue
                    self._stop_probing(instance)
                    instance.unowned_since = None
                    instance.healthy, instance.healthy_since, instance.routed = False, None, False
                    instance.last_probe = None
                    stopped.add(service)
        if due is not None and self._handover is None:
            # A hair late rather than early: the clock's resolution must not cost a second look.
            delay = due - now + 0.01
            self._handover = asyncio.get_running_loop().call_later(delay, self._handover_due)
        if started or stopped:
            log.info("probing_moved", took_over=sorted(started), handed_over=sorted(stopped))

    def _handover_due(self) -> None:
        self._handover = None
        services, self._handing_over = self._handing_over, set()
        self._rebalance(services)

    async def _withdraw(self, unit: UnitName) -> None:
        self._retired.discard(unit)
        instance = self._instances.pop(unit, None)
        if instance is None:
            return
        of_service = self._by_service.get(unit.service, {})
        of_service.pop(unit, None)
        if not of_service:
            self._by_service.pop(unit.service, None)
        # Probed here: this server owns it, routed or not in its memory (a peer may have
        # routed it before the service moved here). Otherwise its owner deregisters it.
        probed = instance.probed
        self._stop_probing(instance)
        if probed:
            try:
                await self.router.deregister(unit.service, instance.server_id)
            except Exception as exc:
                if not is_temporary(exc):
                    raise
                log.warning("instance_deregister_retrying", service=unit.service, reason=str(exc))
                task = asyncio.create_task(
                    self._deregister_until_done(instance), name=f"deregister:{unit}"
                )
                self._deregistering.add(task)
                task.add_done_callback(self._deregistering.discard)
        log.info("instance_withdrawn", service=unit.service, unit=str(unit))
        self.bus.publish(InstanceWithdrawn(service=unit.service, unit=str(unit), url=instance.url))

    async def _deregister_until_done(self, instance: Instance) -> None:
        """Take a withdrawn instance out of the router however long the router's etcd is
        away; anything but a temporary error is logged (the reaper deregisters a server no
        announcement stands behind)."""
        unit, delay = instance.unit, 0.2
        with structlog.contextvars.bound_contextvars(service=unit.service, unit=str(unit)):
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                try:
                    await self.router.deregister(unit.service, instance.server_id)
                    log.info("instance_deregistered_late")
                    return
                except Exception as exc:
                    if not is_temporary(exc):
                        log.exception("instance_deregister_failed")
                        return
                    log.warning("instance_deregister_retrying", reason=str(exc), retry_in=delay)

    # -- the scheduler -------------------------------------------------------------------

    def _start_probing(self, instance: Instance) -> None:
        instance.probed, instance.crashes = True, 0
        instance.forget_probing()
        self._queue(instance, time.monotonic())

    def _stop_probing(self, instance: Instance) -> None:
        """No more probes of it: its next one is dropped and the one in flight cancelled."""
        instance.probed, instance.queued = False, 0
        if instance.probe_task is not None:
            instance.probe_task.cancel()
            instance.probe_task = None
        instance.forget_probing()

    def _queue(self, instance: Instance, at: float) -> None:
        instance.queued = entry = next(self._entries)
        heapq.heappush(self._due, (at, entry, instance))
        if self._due[0][1] == entry:
            self._wake.set()  # earlier than what the scheduler sleeps until

    async def _run_probes(self) -> None:
        """Start every probe that is due, at most ``max_in_flight`` at once, until
        cancelled. Started again after a crash: every probed instance without a probe in
        flight is due at once then, whatever the heap held."""
        now = time.monotonic()
        self._due = []
        for instance in self._instances.values():
            if instance.probed and instance.probe_task is None:
                self._queue(instance, now)
        while True:
            self._wake.clear()
            now, delay = time.monotonic(), None
            while self._due and len(self._in_flight) < self.max_in_flight:
                at, entry, instance = self._due[0]
                if instance.queued != entry:
                    heapq.heappop(self._due)  # dropped or queued again since
                elif at > now:
                    delay = at - now
                    break
                else:
                    heapq.heappop(self._due)
                    instance.queued = 0
                    self._launch(instance)
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _launch(self, instance: Instance) -> None:
        task = asyncio.create_task(self._probe_turn(instance))
        instance.probe_task = task
        self._in_flight.add(task)
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a slot is free

    async def _probe_turn(self, instance: Instance) -> None:
        """One probe of ``instance`` and what follows from it; queues its next probe."""
        unit = instance.unit
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(service=unit.service, unit=str(unit)):
            try:
                wait = await self._probe(instance)
                instance.crashes = 0
            except Exception:
                # Anything but a temporary router error: a bug or a broken router. Probe it
                # afresh after the supervisor's backoff, as a restarted prober would.
                wait = min(BACKOFF_INITIAL * 2**instance.crashes, BACKOFF_MAX)
                instance.crashes += 1
                log.exception("task_crashed", task=f"probe:{unit}", restart_in=wait)
                instance.forget_probing()
        if instance.probe_task is asyncio.current_task():
            instance.probe_task = None
            self._queue(instance, max(started + wait, time.monotonic()))

    async def _probe(self, instance: Instance) -> float:
        """Probe once, take the transition it makes (or one still pending) to the router;
        returns the seconds from the probe's start to the next one."""
        assert self._session is not None
        unit = instance.unit
        if instance.check is None:
            check = await self._check(unit.service)
            if check is None:
                return POLICY_RETRY
            instance.check, instance.tracker = check, HealthTracker(check)
        check, tracker = instance.check, instance.tracker
        assert tracker is not None
        result = await probe(self._session, instance.url, check)
        instance.last_probe = result
        if self.metrics is not None:
            self.metrics.probed(unit.service, result.ok)
        pending = tracker.observe(result) or instance.pending
        try:
            if pending is Transition.BECAME_HEALTHY:
                await self._healthy(instance)
            elif pending is Transition.BECAME_UNHEALTHY:
                await self._unhealthy(instance, result)
            instance.pending = None
        except Exception as exc:
            if not is_temporary(exc):
                raise
            # The router's keys live in etcd: try the transition again after the next probe.
            instance.pending = pending
            log.warning("instance_routing_retrying", reason=str(exc))
        return check.interval

    async def _check(self, service: str) -> HealthPolicy | None:
        """The service's health policy, read now (one read for every instance asking at
        once); while etcd is unreachable the one last read, or None for a service never
        read yet (asked again ``POLICY_RETRY`` seconds later)."""
        reading = self._reading.get(service)
        if reading is None:
            reading = self._reading[service] = asyncio.create_task(self._read_check(service))
            reading.add_done_callback(lambda task: self._read_done(service, task))
        try:
            check = self._checks[service] = await asyncio.shield(reading)
            return check
        except Exception as exc:
            if not is_temporary(exc):
                raise
            if service in self._checks:
                return self._checks[service]
            log.warning("policy_unavailable", reason=str(exc))
            return None

    async def _read_check(self, service: str) -> HealthPolicy:
        return (await self.store.get_policy(service)).health

    def _read_done(self, service: str, task: asyncio.Task[HealthPolicy]) -> None:
        del self._reading[service]
        if not task.cancelled():
            task.exception()  # retrieved: every probe that asked for it may be gone

    async def _healthy(self, instance: Instance) -> None:
        unit = instance.unit
        instance.healthy, instance.healthy_since = True, time.monotonic()
        if unit in self._retired:
            log.info("instance_healthy_retired", url=instance.url)
            return
        await self.router.ensure_service(unit.service)
        await self.router.register(unit.service, instance.server_id, instance.url)
        instance.routed = True
        log.info("instance_healthy", url=instance.url)
        self.bus.publish(InstanceHealthy(service=unit.service, unit=str(unit), url=instance.url))

    async def _unhealthy(self, instance: Instance, result: ProbeResult) -> None:
        unit = instance.unit
        instance.healthy, instance.healthy_since = False, None
        # Routed or not in this process's memory: a peer may have routed it before this
        # server took the service over (or an earlier run of this server did).
        await self.router.deregister(unit.service, instance.server_id)
        instance.routed = False
        log.warning("instance_unhealthy", url=instance.url, probe=result.detail)
        self.bus.publish(
            InstanceUnhealthy(
                service=unit.service, unit=str(unit), url=instance.url, detail=result.detail
            )
        )
