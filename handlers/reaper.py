"""The reaper: level-triggered housekeeping that makes etcd and the router agree with fleet.

Events can be missed: a machine dies without running its units' ``ExecStopPost`` (the
announcement stays), a server crashed between registering a server and recording it. So
every ``interval`` seconds one pass reads fleet's state (units, unit states, machines) and the
announcements as they are, and:

- removes an announcement whose unit is gone from fleet, whose machine left the cluster, whose
  unit fleet moved to another machine, or whose unit systemd reports ``failed``/``inactive``
  there. Removing it is enough: the instances watch withdraws the instance and deregisters it.
  The delete compares the value, so a fresh announcement under the same key is never lost.
- deregisters a router server that no announcement stands behind.

With several servers, each reconciles only the services it owns (``owns``: the ownership
policy of ``handlers/owners.py``), so every service is reaped by one server.

A finding is acted on only when two passes in a row agree, so a unit caught between two
states is left alone. A pass that cannot read fleet or etcd changes nothing.

It also keeps the deploy history short: after each deploy of a service, and on every pass,
only the ``keep`` newest finished deploys are kept, and always the live release and the one a
rollback would return to; unfinished deploys are never touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import structlog

from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.errors import is_temporary
from deployster.events import DeployFailed, DeploySucceeded
from deployster.fleet import FleetClient, Machine, Unit, UnitState
from deployster.keys import parse_announce_key
from deployster.naming import UnitName
from deployster.records import DeployRecord
from deployster.releases import live_release, rollback_target
from deployster.routers import Router
from deployster.store import Store
from deployster.supervise import start_supervised
from deployster.units import Announcement

log = structlog.get_logger(__name__)

# Items a pass handles between two yields to the event loop: a few milliseconds of work.
YIELD_EVERY = 500


@dataclass(frozen=True)
class Announced:
    """One announcement as etcd holds it now."""

    key: str
    raw: str
    unit: UnitName
    announcement: Announcement


@dataclass(frozen=True)
class FleetView:
    """fleet's units, unit states and machines as one pass read them, indexed so that each
    announcement is checked by lookups, not by scanning every state."""

    units: Mapping[str, Unit]
    states: Mapping[tuple[str, str], UnitState]  # by (unit name, machine id)
    machine_ids: AbstractSet[str]  # full ids and fleet's 8-character short ids

    @classmethod
    def of(
        cls, units: Iterable[Unit], states: Iterable[UnitState], machines: Iterable[Machine]
    ) -> FleetView:
        return cls(
            units={u.name: u for u in units},
            states={(s.name, s.machine_id): s for s in states},
            machine_ids={i for m in machines for i in (m.id, m.short_id())},
        )


def stale_reason(found: Announced, fleet: FleetView) -> str | None:
    """Why this announcement no longer stands for a running instance, or None if it does."""
    name = str(found.unit)
    machine = found.announcement.machine
    unit = fleet.units.get(name)
    if unit is None:
        return f"unit {name} is gone from fleet"
    if machine not in fleet.machine_ids:
        return f"machine {machine} left the cluster"
    if unit.machine_id and unit.machine_id[:8] != machine[:8]:  # fleet's short ids match too
        return f"fleet moved unit {name} to machine {unit.machine_id}"
    state = fleet.states.get((name, machine))
    if state is not None and state.active_state in ("failed", "inactive"):
        return f"unit {name} is {state.active_state} on machine {machine}"
    return None


def prunable(records: list[DeployRecord], keep: int) -> list[DeployRecord]:
    """The records of one service to delete: finished ones beyond the ``keep`` newest, never
    the live release or the rollback target. ``records`` are oldest first."""
    spared = {r.id for r in (live_release(records), rollback_target(records)) if r is not None}
    finished = [r for r in records if r.state.finished]
    return [r for r in finished[: max(0, len(finished) - keep)] if r.id not in spared]


class Reaper:
    def __init__(
        self,
        bus: EventBus,
        *,
        fleet: FleetClient,
        store: Store,
        router: Router,
        prefix: str,
        interval: float = 30.0,
        keep: int = 10,
        owns: Callable[[str], bool] = lambda service: True,
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.store = store
        self.router = router
        self.prefix = prefix
        self.interval = interval
        self.keep = keep
        self.owns = owns  # which services this server reaps (by default, every one)
        # What the previous pass found: acted on when this pass finds it again.
        self._suspects: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def register(self) -> None:
        self.bus.subscribe(DeploySucceeded, self.on_deploy_finished)
        self.bus.subscribe(DeployFailed, self.on_deploy_finished)

    async def start(self) -> None:
        self._task = start_supervised("reaper", self._loop)

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    async def on_deploy_finished(self, event: DeploySucceeded | DeployFailed) -> None:
        try:
            await self.prune(event.service)
        except Exception as exc:
            if not is_temporary(exc):
                raise
            log.warning("deploy_history_not_pruned", reason=str(exc))  # the next pass prunes

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                records = [r for r in await self.store.list_deploys() if self.owns(r.service)]
                await self.reconcile({r.service for r in records})
                await self._prune(records)
            except Exception as exc:
                if not is_temporary(exc):
                    raise  # the supervisor logs it and starts the loop again
                log.warning("reconcile_skipped", reason=str(exc))

    # -- history -------------------------------------------------------------------------

    async def prune(self, service: str) -> int:
        """Delete the service's old deploy records; returns how many."""
        return await self._prune(await self.store.list_deploys(service))

    async def _prune(self, records: list[DeployRecord]) -> int:
        by_service: dict[str, list[DeployRecord]] = {}
        for record in records:
            by_service.setdefault(record.service, []).append(record)
        doomed = [r for records in by_service.values() for r in prunable(records, self.keep)]
        if doomed:
            await self.store.delete_deploys(doomed)
            log.info("deploy_history_pruned", deploys=[f"{r.service}/{r.id}" for r in doomed])
        return len(doomed)

    # -- reconcile -----------------------------------------------------------------------

    async def reconcile(self, services: set[str]) -> list[str]:
        """One pass over the announcements and over the router servers of ``services`` (and of
        every announced service), those this server owns; returns what it did, one sentence
        each."""
        fleet = FleetView.of(
            await self.fleet.list_units(),
            await self.fleet.list_states(),
            await self.fleet.list_machines(),
        )
        announced = [a for a in await self._announced() if self.owns(a.unit.service)]
        services = {s for s in services if self.owns(s)}
        stale = {}
        for n, found in enumerate(announced, 1):
            reason = stale_reason(found, fleet)
            if reason is not None:
                stale[f"announcement:{found.key}:{found.raw}"] = (found, reason)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let requests in: a pass never holds the loop for long
        backed = {(a.unit.service, a.unit.container) for a in announced}
        orphans = {}
        for service in sorted(services | {a.unit.service for a in announced}):
            for server_id in await self.router.servers(service):
                if (service, server_id) not in backed:
                    orphans[f"server:{service}:{server_id}"] = (service, server_id)
        done = []
        for finding, (found, reason) in stale.items():
            if finding in self._suspects and await self.store.withdraw_announcement(
                found.key, found.raw
            ):
                done.append(f"removed the announcement of {found.unit}: {reason}")
        for finding, (service, server_id) in orphans.items():
            if finding in self._suspects:
                await self.router.deregister(service, server_id)
                done.append(
                    f"deregistered {server_id} of {service}: no announced instance stands behind it"
                )
        for action in done:
            log.warning("reconciled", action=action)
        # Acted on now, or seen for the first time: the next pass confirms the latter.
        self._suspects = (stale.keys() | orphans.keys()) - self._suspects
        return done

    async def _announced(self) -> list[Announced]:
        found = []
        for n, (key, raw) in enumerate((await self.store.announcements()).items(), 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            unit = parse_announce_key(self.prefix, key)
            if unit is None:
                continue
            try:
                announcement = Announcement.model_validate_json(raw)
            except ValueError:
                continue
            found.append(Announced(key=key, raw=raw, unit=unit, announcement=announcement))
        return found
