"""Deploys: from ``DeployRequested`` to launched fleet units, followed until they run.

This is the one place where a deploy's steps live:

1. **Plan** with the original's rules (`reference/original-deployster.md` §2.2, §5.1): the
   service's current units decide the instance count and whether ``destroy_previous`` can
   be honoured; the two 400 texts are kept verbatim, double spaces included.
2. **Record** the deploy in etcd (``pending``) before fleet hears of it, so a restart finds it.
3. **Submit** every unit (create, then set ``launched``, as fleetctl does). If fleet fails
   half-way, the units already created are destroyed again: nothing is left half-done.
4. **Follow** fleet's unit states until every new unit is ``active/running`` and has
   announced its URL in etcd (no fixed sleep, unlike the original); then destroy
   the previous units (all of them, as a set, not paired by instance number). A unit that
   fails, or a deploy that misses its deadline, destroys the new units and leaves the old
   ones serving (``rolled_back``).

A restart re-drives unfinished records (``DeployResumed``); every step is idempotent (a unit
that already exists is not an error).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from deployster.bus import EventBus
from deployster.events import (
    DeployFailed,
    DeployRejected,
    DeployRequested,
    DeployResumed,
    DeploySucceeded,
    DestroyRequested,
    UnitsDestroyed,
    UnitsSubmitted,
)
from deployster.fleet import FleetClient, FleetError, FleetNotFound, FleetConflict, Unit
from deployster.naming import UnitName
from deployster.store import DeployRecord, DeployState, Store
from deployster.units import UnitContext, UnitTemplate, announce_key, image_name, render_unit

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


@dataclass(frozen=True)
class DeployConfig:
    """What a deploy needs from the server's settings."""

    image_prefix: str
    etcd_endpoints: str
    etcd_prefix: str
    poll_interval: float = 1.0
    deadline: float = 300.0


class DeployRejectedError(Exception):
    """The request cannot be honoured as asked (a 400 with this sentence)."""


async def service_units(fleet: FleetClient, service: str) -> list[tuple[UnitName, Unit]]:
    """Every managed unit of ``service``, in fleet's order, whatever its state."""
    found = []
    for unit in await fleet.list_units():
        name = UnitName.parse(unit.name)
        if name is not None and name.service == service:
            found.append((name, unit))
    return found


def plan(
    request: DeployRequested, current: list[UnitName]
) -> tuple[int, bool]:
    """Instance count and effective ``destroy_previous`` by the original's rules."""
    releases = {name.release for name in current}
    destroy_previous = request.destroy_previous
    if destroy_previous:
        if len(releases) > 1:
            raise DeployRejectedError(TOO_MANY_VERSIONS)
        if request.instance_count and request.instance_count < len(current):
            raise DeployRejectedError(TOO_MANY_INSTANCES)
        if not releases:
            destroy_previous = False
    if request.instance_count:
        count = request.instance_count
    elif len(releases) == 1:
        count = len(current)
    else:
        count = 1
    return count, destroy_previous


class DeployHandler:
    def __init__(
        self,
        bus: EventBus,
        fleet: FleetClient,
        store: Store,
        template: UnitTemplate,
        config: DeployConfig,
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.store = store
        self.template = template
        self.config = config

    def register(self) -> None:
        self.bus.subscribe(DeployRequested, self.on_requested)
        self.bus.subscribe(DeployResumed, self.on_resumed)
        self.bus.subscribe(DestroyRequested, self.on_destroy_requested)

    async def resume(self) -> int:
        """Re-drive every unfinished deploy found in etcd; returns how many."""
        unfinished = [r for r in await self.store.list_deploys() if not r.state.finished]
        for record in unfinished:
            self.bus.publish(DeployResumed(service=record.service, deploy_id=record.id))
        return len(unfinished)

    # -- handlers ----------------------------------------------------------------------

    async def on_requested(self, event: DeployRequested) -> None:
        try:
            current = await service_units(self.fleet, event.service)
            count, destroy_previous = plan(event, [name for name, _ in current])
        except DeployRejectedError as exc:
            log.info("deploy_rejected", reason=str(exc))
            self.bus.publish(
                DeployRejected(service=event.service, deploy_id=event.deploy_id, description=str(exc))
            )
            return
        except FleetError as exc:
            log.warning("deploy_not_started", reason=exc.message)
            self.bus.publish(
                DeployFailed(service=event.service, deploy_id=event.deploy_id, reason=exc.message)
            )
            return
        record = DeployRecord.from_request(event, count, destroy_previous)
        record.units = [
            str(UnitName.build(event.service, event.version, event.timestamp, n))
            for n in range(1, count + 1)
        ]
        if destroy_previous:
            record.previous_units = [str(name) for name, _ in current]
        record = await self.store.save_deploy(record)
        log.info("deploy_planned", version=record.version, instances=count,
                 destroy_previous=destroy_previous)
        await self._submit(record)

    async def on_resumed(self, event: DeployResumed) -> None:
        record = await self.store.get_deploy(event.service, event.deploy_id)
        if record is None or record.state.finished:
            return
        log.info("deploy_resumed", state=record.state)
        if record.state is DeployState.PENDING:
            await self._submit(record)
        else:
            self._follow(record)

    async def on_destroy_requested(self, event: DestroyRequested) -> None:
        destroyed: list[str] = []
        failures: dict[str, str] = {}
        try:
            current = await service_units(self.fleet, event.service)
        except FleetError as exc:
            failures["*"] = exc.message
            current = []
        for name, _ in current:
            if name.version != event.version:
                continue
            if event.timestamp and name.timestamp != event.timestamp:
                continue
            try:
                await self._destroy(str(name))
                destroyed.append(str(name))
            except FleetError as exc:
                failures[str(name)] = exc.message
        log.info("units_destroyed", version=event.version, units=destroyed, failures=failures)
        self.bus.publish(
            UnitsDestroyed(service=event.service, request_id=event.request_id,
                           units=destroyed, failures=failures)
        )

    # -- steps -------------------------------------------------------------------------

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
            await self._finish(record, DeployState.FAILED, f"fleet refused the units: {exc.message}")
            return
        record.state = DeployState.RUNNING
        record = await self.store.save_deploy(record)
        log.info("units_submitted", units=record.units)
        self.bus.publish(
            UnitsSubmitted(service=record.service, deploy_id=record.id, units=record.units)
        )
        self._follow(record)

    def _follow(self, record: DeployRecord) -> None:
        self.bus.spawn(
            self._await_running(record),
            name=f"follow:{record.service}:{record.id}",
            service=record.service,
            deploy_id=record.id,
        )

    async def _await_running(self, record: DeployRecord) -> None:
        deadline = record.created_at.timestamp() + self.config.deadline
        waiting = set(record.units)
        while waiting:
            try:
                states = {s.name: s for s in await self.fleet.list_states() if s.name in waiting}
            except FleetError as exc:
                log.warning("fleet_state_unavailable", reason=exc.message)
                states = {}
            for unit, state in sorted(states.items()):
                # systemd says "running" as soon as the main process is spawned; the instance
                # is up once it has also announced where it answers.
                if state.active_state == "active" and state.sub_state == "running":
                    if await self._announced(unit):
                        log.info("unit_running", unit=unit, machine=state.machine_id)
                        waiting.discard(unit)
                elif state.active_state == "failed":
                    await self._roll_back(record, f"unit {unit} failed to start "
                                                  f"(systemd {state.active_state}/{state.sub_state})")
                    return
            if not waiting:
                break
            if time.time() > deadline:
                await self._roll_back(record, f"units {', '.join(sorted(waiting))} were not running "
                                              f"after {self.config.deadline:.0f} s")
                return
            await asyncio.sleep(self.config.poll_interval)
        if record.destroy_previous:
            await self._destroy_all(record.previous_units)
            log.info("previous_units_destroyed", units=record.previous_units)
        await self._finish(record, DeployState.SUCCEEDED)

    async def _roll_back(self, record: DeployRecord, reason: str) -> None:
        log.warning("deploy_rolling_back", reason=reason)
        await self._destroy_all(record.units)
        await self._finish(record, DeployState.ROLLED_BACK, reason)

    async def _finish(self, record: DeployRecord, state: DeployState, error: str | None = None) -> None:
        record.state = state
        record.error = error
        await self.store.save_deploy(record)
        log.info("deploy_finished", state=state, error=error)
        if state is DeployState.SUCCEEDED:
            self.bus.publish(DeploySucceeded(service=record.service, deploy_id=record.id))
        else:
            self.bus.publish(DeployFailed(service=record.service, deploy_id=record.id, reason=error or state))

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

    async def _announced(self, unit: str) -> bool:
        name = UnitName.parse(unit)
        assert name is not None
        return await self.store.announcement(announce_key(self.config.etcd_prefix, name)) is not None

    def _context(self, name: UnitName, record: DeployRecord) -> UnitContext:
        return UnitContext(
            unit=name,
            image=image_name(self.config.image_prefix, name.service, name.version),
            env=record.env,
            etcd_endpoints=self.config.etcd_endpoints,
            announce_key=announce_key(self.config.etcd_prefix, name),
        )
