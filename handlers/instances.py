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

Faults are normal here. Probing never waits for etcd: each prober keeps the service's policy
it last read, and a router write that fails (the router's keys live in etcd) is kept as the
instance's pending transition and tried again after every probe, so an instance that stops
answering leaves the router as soon as the router can be written, and a healthy one is
routed as soon as etcd is back. A withdrawn instance's deregistration is retried until it
succeeds. The watch and every prober run supervised: a crash is logged and they start again.

With several servers, each service is probed and routed by its owner (``handlers/owners.py``:
one live server by rendezvous hashing, or the server driving a deploy of it). Every server
still follows every announcement, so when ownership moves (a peer died, joined or left, a
deploy began or ended) the probers of newly owned services start at once and those of
services no longer owned stop a moment later, leaving the router as it is: the new owner
carries on from what it probes. A server that
takes over an instance does not know whether it is routed, so an instance found unhealthy is
always deregistered (a deregistration of a server the router does not hold changes nothing).

The deploy state machine reads the live view (:meth:`InstancesHandler.get`) to decide when a
new release is healthy and routed, and *retires* instances it is replacing or rolling back, so
that a late successful probe never puts them back into rotation.
"""

from __future__ import annotations

import asyncio
import time
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
from deployster.policy import ServicePolicy
from deployster.routers import Router
from deployster.store import Store
from deployster.supervise import start_supervised
from deployster.units import Announcement
from handlers.owners import HANDOVER_GRACE, Owners
from handlers.reconcile import InstanceView

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Instance:
    """What is known of one announced instance right now (slots: one per instance, 10,000 in a
    big fleet)."""

    unit: UnitName
    url: str
    machine: str
    healthy: bool = False
    healthy_since: float | None = None  # monotonic time of the last healthy transition
    announced_at: float = field(default_factory=time.time)  # epoch seconds this process saw it
    routed: bool = False
    last_probe: ProbeResult | None = None
    prober: asyncio.Task[None] | None = field(default=None, repr=False)
    unowned_since: float | None = None  # monotonic time this server stopped owning it

    @property
    def server_id(self) -> str:
        return self.unit.container

    def describe_last_probe(self) -> str:
        if self.prober is None:
            return "not probed by this server: another server owns the service"
        return self.last_probe.detail if self.last_probe else "no probe has answered yet"


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
    ) -> None:
        self.bus = bus
        self.etcd = etcd
        self.store = store
        self.router = router
        self.prefix = prefix
        self.metrics = metrics
        self.owners = owners  # None: this server alone, it owns every service
        if owners is not None:
            owners.subscribe(self._rebalance)
        self._instances: dict[UnitName, Instance] = {}
        self._retired: set[UnitName] = set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._policies: dict[str, ServicePolicy] = {}  # the last one read, for etcd outages
        self._deregistering: set[asyncio.Task[None]] = set()
        self._synced = asyncio.Event()  # the announcements were read once
        self._handover: asyncio.TimerHandle | None = None  # the next look at unowned probers

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
        return [i for u, i in self._instances.items() if u.service == service]

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
        return sum(1 for s in {u.service for u in self._instances} if self.owns(s))

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, wait: float = 5.0) -> None:
        """Follow the announcements; return once they were read and the probers of the owned
        services started (or after ``wait`` seconds, the watch going on)."""
        self._session = aiohttp.ClientSession()
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
            self._task, *(i.prober for i in self._instances.values()), *self._deregistering
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
        if self.owns(unit.service):
            self._start_prober(instance)
        log.info("instance_announced", service=unit.service, unit=str(unit), url=instance.url)

    def _start_prober(self, instance: Instance) -> None:
        instance.prober = start_supervised(
            f"probe:{instance.unit}",
            lambda: self._probe_forever(instance),
            service=instance.unit.service,
            unit=str(instance.unit),
        )

    def _rebalance(self) -> None:
        """Ownership changed: probe what is owned now at once; stop probing the rest once it
        has not been owned for ``HANDOVER_GRACE`` seconds (the new owner probes by then, and a
        change undone meanwhile, such as a lock seen before its claim, changes nothing). A
        stopped prober leaves the router alone (the new owner takes it from there) and forgets
        what it saw, so nothing here reads its stale health."""
        now = time.monotonic()
        started, stopped, due = set(), set(), None
        for instance in self._instances.values():
            if self.owns(instance.unit.service):
                instance.unowned_since = None
                if instance.prober is None:
                    self._start_prober(instance)
                    started.add(instance.unit.service)
            elif instance.prober is not None:
                if instance.unowned_since is None:
                    instance.unowned_since = now
                if now - instance.unowned_since < HANDOVER_GRACE:
                    at = instance.unowned_since + HANDOVER_GRACE
                    due = at if due is None else min(due, at)
                    continue
                instance.prober.cancel()
                instance.prober, instance.unowned_since = None, None
                instance.healthy, instance.healthy_since, instance.routed = False, None, False
                instance.last_probe = None
                stopped.add(instance.unit.service)
        if due is not None and self._handover is None:
            # A hair late rather than early: the clock's resolution must not cost a second look.
            delay = due - now + 0.01
            self._handover = asyncio.get_running_loop().call_later(delay, self._handover_due)
        if started or stopped:
            log.info("probing_moved", took_over=sorted(started), handed_over=sorted(stopped))

    def _handover_due(self) -> None:
        self._handover = None
        self._rebalance()

    async def _withdraw(self, unit: UnitName) -> None:
        self._retired.discard(unit)
        instance = self._instances.pop(unit, None)
        if instance is None:
            return
        # Probed here: this server owns it, routed or not in its memory (a peer may have
        # routed it before the service moved here). Otherwise its owner deregisters it.
        probed = instance.prober is not None
        if instance.prober is not None:
            instance.prober.cancel()
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

    # -- probing -------------------------------------------------------------------------

    async def _probe_forever(self, instance: Instance) -> None:
        assert self._session is not None
        unit = instance.unit
        policy = await self._policy(unit.service)
        tracker = HealthTracker(policy.health)
        pending: Transition | None = None  # a transition the router has not taken yet
        while True:
            started = time.monotonic()
            result = await probe(self._session, instance.url, policy.health)
            instance.last_probe = result
            if self.metrics is not None:
                self.metrics.probed(unit.service, result.ok)
            pending = tracker.observe(result) or pending
            try:
                if pending is Transition.BECAME_HEALTHY:
                    await self._healthy(instance)
                elif pending is Transition.BECAME_UNHEALTHY:
                    await self._unhealthy(instance, result)
                pending = None
            except Exception as exc:
                if not is_temporary(exc):
                    raise  # the supervisor logs it and probes afresh
                # The router's keys live in etcd: try the transition again after the next probe.
                log.warning("instance_routing_retrying", reason=str(exc))
            await asyncio.sleep(max(0.0, policy.health.interval - (time.monotonic() - started)))

    async def _policy(self, service: str) -> ServicePolicy:
        """The service's policy; while etcd is unreachable, the one last read (probing goes
        on), or, for a service never read yet, keep asking."""
        while True:
            try:
                policy = self._policies[service] = await self.store.get_policy(service)
                return policy
            except Exception as exc:
                if not is_temporary(exc):
                    raise
                if service in self._policies:
                    return self._policies[service]
                log.warning("policy_unavailable", reason=str(exc))
                await asyncio.sleep(1.0)

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
