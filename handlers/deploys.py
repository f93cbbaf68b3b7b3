"""Deploys: the state machine from ``DeployRequested`` to a healthy, routed release.

This is the one place where a deploy's steps live. Each step is written to the deploy's
record in etcd before it starts, so a restarted server picks the deploy up where it was
(``DeployResumed``), and each step is idempotent (a unit that exists already, a server that
is not registered, a unit that is gone: none is an error).

1. **Lock** the service (an etcd key on a kept-alive lease): a second deploy of the same
   service while one runs is refused with 409 naming the holder, or, when the caller asked to
   wait (``wait_for_lock``), recorded as ``queued`` and started once the lock is free, oldest
   queued first, within the policy's ``deploy_deadline``. A crashed server's lock goes with
   its lease; a resumed deploy adopts its own lock.
2. **Plan**, holding the lock, with the original's rules (`reference/original-deployster.md`
   §2.2, §5.1): the service's current units decide the instance count and whether
   ``destroy_previous`` can be honoured; the two 400 texts are kept verbatim, double spaces
   included. The service's policy (``PUT .../policy``) is read now and kept in the record: a
   policy change applies to the next deploy, never to a running one.
3. **Record** the deploy (``pending``), then **submit** every unit (create, then launch, as
   fleetctl does). If fleet fails half-way, the units already created are destroyed again.
4. **Wait** (start-first) until every new instance is healthy, has stayed healthy for the
   policy's ``min_healthy_time``, and is routed (``handlers/instances.py`` probes and
   registers; the router confirms). A new unit that fleet reports ``failed``, or an instance
   not healthy within ``instance_deadline`` (or the deploy past ``deploy_deadline``), rolls
   back: the new instances are deregistered and destroyed, the old ones never lost traffic.
5. **Switch** (with ``destroy_previous``): deregister every previous unit of the service (as a
   set, failed leftovers included, never paired by instance number), wait until the router
   applied it and the ``drain`` time passed, then destroy them.

Every step also adds a progress event to the record (``DeployRecord.note``): the events
stream of the API and ``deployctl deploy --wait`` show them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aetcd
import structlog

from deployster.bus import EventBus
from deployster.etcd import EtcdError, LeaseKeeper
from deployster.events import (
    DeployFailed,
    DeployQueued,
    DeployRejected,
    DeployRequested,
    DeployResumed,
    DeploySucceeded,
    DestroyRequested,
    UnitsDestroyed,
    UnitsSubmitted,
)
from deployster.fleet import FleetClient, FleetConflict, FleetError, FleetNotFound, Unit
from deployster.naming import UnitName
from deployster.policy import ServicePolicy
from deployster.routers import Router, RouterError
from deployster.store import DeployRecord, DeployState, DeployStep, LockHolder, Store
from deployster.units import UnitContext, UnitTemplate, announce_key, image_name, render_unit
from handlers.instances import InstancesHandler

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
LOCK_TTL = 15  # seconds a crashed server's lock outlives it
RETRY_INITIAL, RETRY_MAX = 0.2, 5.0  # backoff of a step that met an unreachable etcd or fleet


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
    # How often a queued deploy looks whether the service's lock is free.
    queue_poll: float = 0.5


class DeployRejectedError(Exception):
    """The request cannot be honoured as asked (a 400 or 409 with this sentence)."""

    def __init__(self, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.status = status


class LockHeld(DeployRejectedError):
    """Another deploy of the service holds its lock."""

    def __init__(self, service: str, held: LockHolder) -> None:
        super().__init__(
            f"Service {service!r} is being deployed by deploy {held.holder} "
            f"({held.reason}, by {held.actor or 'unknown'}, since {held.since:%Y-%m-%d %H:%M:%S} UTC); "
            "wait for it to finish, then deploy again.",
            status=409,
        )
        self.held = held


class RollBack(Exception):
    """The new release cannot become healthy; the message says which instance and why."""


async def service_units(fleet: FleetClient, service: str) -> list[tuple[UnitName, Unit]]:
    """Every managed unit of ``service``, in fleet's order, whatever its state."""
    found = []
    for unit in await fleet.list_units():
        name = UnitName.parse(unit.name)
        if name is not None and name.service == service:
            found.append((name, unit))
    return found


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


def rollback_target(records: list[DeployRecord]) -> DeployRecord | None:
    """The release to roll back to: the last successful deploy before the live one (the
    newest successful deploy) whose version differs from it. ``records`` are oldest first."""
    succeeded = [r for r in records if r.state is DeployState.SUCCEEDED]
    if not succeeded:
        return None
    live = succeeded[-1]
    return next((r for r in reversed(succeeded[:-1]) if r.version != live.version), None)


class DeployHandler:
    def __init__(
        self,
        bus: EventBus,
        fleet: FleetClient,
        store: Store,
        template: UnitTemplate,
        config: DeployConfig,
        router: Router,
        instances: InstancesHandler,
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.store = store
        self.template = template
        self.config = config
        self.router = router
        self.instances = instances
        self._leases: dict[str, LeaseKeeper] = {}

    def register(self) -> None:
        self.bus.subscribe(DeployRequested, self.on_requested)
        self.bus.subscribe(DeployResumed, self.on_resumed)
        self.bus.subscribe(DestroyRequested, self.on_destroy_requested)

    async def resume(self) -> int:
        """Re-drive every unfinished deploy found in etcd; returns how many."""
        unfinished = [r for r in await self.store.deploy_summaries() if not r.state.finished]
        for record in unfinished:
            self.bus.publish(DeployResumed(service=record.service, deploy_id=record.id))
        return len(unfinished)

    async def close(self) -> None:
        """Stop keeping locks alive without releasing them: a restart resumes and adopts them."""
        for keeper in self._leases.values():
            await keeper.stop()

    # -- handlers ----------------------------------------------------------------------

    async def on_requested(self, event: DeployRequested) -> None:
        record = DeployRecord.from_request(
            event, event.instance_count, event.destroy_previous, ServicePolicy()
        )
        try:
            await self._lock(record)
        except LockHeld as exc:
            if event.wait_for_lock:
                await self._queue(record, exc.held)
            else:
                self._reject(event, exc)
            return
        try:
            record = await self._plan(record)
        except DeployRejectedError as exc:
            await self._unlock(record)
            self._reject(event, exc)
            return
        except FleetError as exc:
            await self._unlock(record)
            log.warning("deploy_not_started", reason=exc.message)
            self.bus.publish(
                DeployFailed(service=event.service, deploy_id=event.deploy_id, reason=exc.message)
            )
            return
        record = await self.store.save_deploy(record)
        await self._submit(record)

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

    async def _plan(self, record: DeployRecord) -> DeployRecord:
        """Fill in the policy, the instance count, the units and the units they replace; the
        caller holds the service's lock, so what runs cannot change meanwhile.

        ``record.instance_count`` and ``destroy_previous`` are what was asked for; the
        returned record has what will be done. Raises DeployRejectedError for the original's
        400s, FleetError when fleet cannot say what runs.
        """
        policy = await self.store.get_policy(record.service)
        current = await service_units(self.fleet, record.service)
        asked = DeployRequested(
            service=record.service,
            deploy_id=record.id,
            version=record.version,
            timestamp=record.timestamp,
            instance_count=record.instance_count,
            destroy_previous=record.destroy_previous,
        )
        count, destroy_previous = plan(asked, [n for n, _ in current], policy.instance_count)
        record = record.model_copy(
            update={
                "policy": policy,
                "instance_count": count,
                "destroy_previous": destroy_previous,
                "units": [
                    str(UnitName.build(record.service, record.version, record.timestamp, n))
                    for n in range(1, count + 1)
                ],
                "previous_units": [str(name) for name, _ in current] if destroy_previous else [],
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

    async def _queue(self, record: DeployRecord, held: LockHolder) -> None:
        """Record the deploy as queued behind the lock's holder and wait for its turn."""
        record.step = DeployStep.QUEUED
        record.policy = await self.store.get_policy(record.service)  # its deadline bounds the wait
        record.note("queued", f"waiting for deploy {held.holder} ({held.reason}) to finish")
        record = await self.store.save_deploy(record)
        log.info("deploy_queued", behind=held.holder)
        self.bus.publish(
            DeployQueued(service=record.service, deploy_id=record.id, behind=held.holder)
        )
        self._spawn(record, self._dequeue(record))

    async def _dequeue(self, record: DeployRecord) -> None:
        """Poll until this deploy is the oldest queued one and the lock is free, then take the
        lock, plan (the service changed while it waited) and submit."""
        deadline = record.created_at.timestamp() + record.policy.deploy_deadline
        while True:
            try:
                if time.time() > deadline:
                    await self._finish(
                        record,
                        DeployState.FAILED,
                        f"the service's lock was not free within the deploy deadline "
                        f"of {record.policy.deploy_deadline:g} s",
                    )
                    return
                if await self._my_turn(record):
                    await self._lock(record)
                    planned = await self._plan(record)
                    planned.step = DeployStep.SUBMITTING
                    record = await self.store.save_deploy(planned)
                    await self._submit(record)
                    return
            except LockHeld:
                pass  # another deploy took it first
            except DeployRejectedError as exc:
                await self._finish(record, DeployState.FAILED, str(exc))
                return
            except (EtcdError, aetcd.ClientError, FleetError) as exc:
                log.warning("deploy_queue_retrying", reason=str(exc))
            await asyncio.sleep(self.config.queue_poll)

    async def _my_turn(self, record: DeployRecord) -> bool:
        holder = await self.store.locks.holder(record.service)
        if holder is not None and holder.holder != record.id:
            return False
        queued = [
            r
            for r in await self.store.list_deploys(record.service)
            if r.step is DeployStep.QUEUED and not r.state.finished
        ]
        return bool(queued) and queued[0].id == record.id

    async def on_resumed(self, event: DeployResumed) -> None:
        record = await self.store.get_deploy(event.service, event.deploy_id)
        if record is None or record.state.finished:
            return
        log.info("deploy_resumed", state=record.state, step=record.step)
        if record.step is DeployStep.QUEUED:
            self._spawn(record, self._dequeue(record))
            return
        record.note("resumed", f"a restarted server resumes the deploy at step {record.step}")
        await self._lock(record, adopt=True)
        if record.state is DeployState.PENDING:
            await self._submit(record)
        else:
            self._spawn(record, self._run(record))

    async def on_destroy_requested(self, event: DestroyRequested) -> None:
        destroyed: list[str] = []
        failures: dict[str, str] = {}
        try:
            current = await service_units(self.fleet, event.service)
        except FleetError as exc:
            failures["*"] = exc.message
            current = []
        matching = [
            n
            for n, _ in current
            if n.version == event.version
            and (not event.timestamp or n.timestamp == event.timestamp)
        ]
        await self._retire(matching)
        for name in matching:
            try:
                await self._destroy(str(name))
                destroyed.append(str(name))
            except FleetError as exc:
                failures[str(name)] = exc.message
        log.info("units_destroyed", version=event.version, units=destroyed, failures=failures)
        self.bus.publish(
            UnitsDestroyed(
                service=event.service,
                request_id=event.request_id,
                units=destroyed,
                failures=failures,
            )
        )

    # -- steps -------------------------------------------------------------------------

    async def _lock(self, record: DeployRecord, adopt: bool = False) -> None:
        if record.id in self._leases:
            return  # held already (a step retried after an etcd error)
        taken = await self.store.locks.take(
            record.service,
            record.id,
            record.actor,
            f"deploy of {record.version}",
            LOCK_TTL,
            adopt=adopt,
        )
        if isinstance(taken, LockHolder):
            raise LockHeld(record.service, taken)
        if not record.started_at:
            record.started_at = time.time()
        self._leases[record.id] = taken

    async def _unlock(self, record: DeployRecord) -> None:
        await self.store.locks.release(record.service, record.id)
        keeper = self._leases.pop(record.id, None)
        if keeper is not None:
            await keeper.revoke()

    async def _submit(self, record: DeployRecord) -> None:
        created: list[str] = []
        try:
            for unit in record.units:
                name = UnitName.parse(unit)
                assert name is not None
                options = render_unit(self.template, self._context(name, record))
                try:
                    await self.fleet.create_unit(unit, options)
                except FleetConflict:
                    pass  # already submitted before a restart: same name, same options
                created.append(unit)
            for unit in record.units:
                await self.fleet.set_desired_state(unit, "launched")
        except FleetError as exc:
            await self._destroy_all(created)
            await self._finish(
                record, DeployState.FAILED, f"fleet refused the units: {exc.message}"
            )
            return
        record.state, record.step = DeployState.RUNNING, DeployStep.WAITING
        record.submitted_at = time.time()
        record.note(
            "submitted", f"fleet accepted {len(record.units)} unit(s): {', '.join(record.units)}"
        )
        record = await self.store.save_deploy(record)
        log.info("units_submitted", units=record.units)
        self.bus.publish(
            UnitsSubmitted(service=record.service, deploy_id=record.id, units=record.units)
        )
        self._spawn(record, self._run(record))

    def _spawn(self, record: DeployRecord, work: Coroutine[Any, Any, None]) -> None:
        """Follow the deploy beside the bus's lanes: waiting its turn, or driving it to its end."""
        self.bus.spawn(
            work,
            name=f"deploy:{record.service}:{record.id}",
            service=record.service,
            deploy_id=record.id,
        )

    async def _run(self, record: DeployRecord) -> None:
        """Drive the deploy to its end. etcd (or fleet) being unreachable for a while is not
        the deploy's fault: the step is retried with backoff (every step is idempotent), and
        only the deploy's own deadlines end it."""
        backoff = RETRY_INITIAL
        while True:
            try:
                await self._advance(record)
                return
            except (EtcdError, aetcd.ClientError, FleetError) as exc:
                log.warning(
                    "deploy_step_retrying", step=record.step, reason=str(exc), retry_in=backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)

    async def _advance(self, record: DeployRecord) -> None:
        if record.step is DeployStep.WAITING:
            try:
                await self._wait_healthy(record)
            except RollBack as exc:
                record.step, record.error = DeployStep.ROLLING_BACK, str(exc)
                record.note("rolling_back", str(exc))
                record = await self.store.save_deploy(record)
            else:
                record.step = DeployStep.SWITCHING
                record = await self.store.save_deploy(record)
        if record.step is DeployStep.ROLLING_BACK:
            await self._roll_back(record)
            return
        if record.destroy_previous:
            await self._switch(record)
        await self._finish(record, DeployState.SUCCEEDED)

    async def _wait_healthy(self, record: DeployRecord) -> None:
        policy = record.policy
        units = [n for n in map(UnitName.parse, record.units) if n is not None]
        instance_deadline = record.submitted_at + policy.instance_deadline
        deploy_deadline = (
            record.started_at or record.created_at.timestamp()
        ) + policy.deploy_deadline
        next_fleet_check = 0.0
        noted = {(e.kind, e.unit) for e in record.events}
        while True:
            now = time.time()
            if now >= next_fleet_check:
                next_fleet_check = now + self.config.poll_interval
                await self._check_not_failed(record)
            ready, progress = [], []
            for unit in units:
                instance = self.instances.get(unit)
                if instance is None or not instance.routed or instance.healthy_since is None:
                    continue
                if time.monotonic() - instance.healthy_since >= policy.min_healthy_time:
                    ready.append(instance)
                    progress.append(
                        ("instance_ready", unit, f"{unit} is healthy and routed at {instance.url}")
                    )
                else:
                    progress.append(
                        (
                            "instance_healthy",
                            unit,
                            f"{unit} passes its health check and is routed at {instance.url}; "
                            f"ready once healthy for {policy.min_healthy_time:g} s",
                        )
                    )
            fresh = [
                (kind, unit, message)
                for kind, unit, message in progress
                if (kind, str(unit)) not in noted
            ]
            for kind, unit, message in fresh:
                noted.add((kind, str(unit)))
                record.note(kind, message, unit=str(unit))
            if fresh:
                await self.store.save_deploy(record)
            if len(ready) == len(units):
                break
            if now > min(instance_deadline, deploy_deadline):
                late = [u for u in units if u not in {i.unit for i in ready}]
                raise RollBack(self._late_reason(late, now > deploy_deadline, policy))
            await asyncio.sleep(0.05)
        try:
            await self.router.wait_applied(
                record.service, present=[i.url for i in ready], timeout=self.config.router_timeout
            )
        except RouterError as exc:
            raise RollBack(f"the router did not route the new instances: {exc}") from None
        log.info("release_healthy", urls=[i.url for i in ready])
        record.note("routed", f"the router sends traffic to all {len(ready)} new instance(s)")

    def _late_reason(self, late: list[UnitName], whole_deploy: bool, policy: ServicePolicy) -> str:
        unit = late[0]
        instance = self.instances.get(unit)
        seen = instance.describe_last_probe() if instance else "it never announced itself"
        limit = (
            f"the deploy deadline of {policy.deploy_deadline:g} s"
            if whole_deploy
            else f"its deadline of {policy.instance_deadline:g} s"
        )
        more = f" (and {len(late) - 1} more)" if len(late) > 1 else ""
        return f"instance {unit} was not healthy within {limit}{more}; last probe: {seen}"

    async def _check_not_failed(self, record: DeployRecord) -> None:
        try:
            states = await self.fleet.list_states()
        except FleetError as exc:
            log.warning("fleet_state_unavailable", reason=exc.message)
            return
        for state in states:
            if state.name in record.units and state.active_state == "failed":
                raise RollBack(
                    f"unit {state.name} failed (systemd {state.active_state}/{state.sub_state})"
                )

    async def _switch(self, record: DeployRecord) -> None:
        previous = [n for n in map(UnitName.parse, record.previous_units) if n is not None]
        urls = await self._retire(previous)
        record.note(
            "retiring",
            f"{len(urls)} previous instance(s) out of the router; "
            f"draining for {record.policy.drain:g} s",
        )
        await self.store.save_deploy(record)
        await asyncio.sleep(record.policy.drain)
        await self._destroy_all(record.previous_units)
        record.note(
            "previous_destroyed", f"destroyed {len(record.previous_units)} previous unit(s)"
        )
        log.info("previous_units_destroyed", units=record.previous_units, drained=urls)

    async def _roll_back(self, record: DeployRecord) -> None:
        log.warning("deploy_rolling_back", reason=record.error)
        await self._retire([n for n in map(UnitName.parse, record.units) if n is not None])
        await self._destroy_all(record.units)
        await self._finish(record, DeployState.ROLLED_BACK, record.error)

    async def _retire(self, units: list[UnitName]) -> list[str]:
        """Take units out of the router and wait until it applied that."""
        if not units:
            return []
        urls = await self.instances.retire(units)
        try:
            await self.router.wait_applied(
                units[0].service, absent=urls, timeout=self.config.router_timeout
            )
        except RouterError as exc:
            log.warning("router_not_confirmed", reason=str(exc))
        return urls

    async def _finish(
        self, record: DeployRecord, state: DeployState, error: str | None = None
    ) -> None:
        record.state, record.step, record.error = state, DeployStep.DONE, error
        summary = (
            f"{record.version} is live with {len(record.units)} instance(s)"
            if state is DeployState.SUCCEEDED
            else error or str(state)
        )
        record.note(str(state), summary)
        await self.store.save_deploy(record)
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

    async def _destroy_all(self, units: list[str]) -> None:
        for unit in units:
            try:
                await self._destroy(unit)
            except FleetError as exc:
                log.warning("unit_destroy_failed", unit=unit, reason=exc.message)

    async def _destroy(self, unit: str) -> None:
        try:
            await self.fleet.destroy_unit(unit)
        except FleetNotFound:
            pass  # already gone: the goal is reached

    def _context(self, name: UnitName, record: DeployRecord) -> UnitContext:
        return UnitContext(
            unit=name,
            image=image_name(self.config.image_prefix, name.service, name.version),
            env=record.env,
            etcd_endpoints=self.config.etcd_endpoints,
            announce_key=announce_key(self.config.etcd_prefix, name),
        )
