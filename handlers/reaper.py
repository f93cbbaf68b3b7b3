"""The reaper: level-triggered housekeeping that makes etcd and the router agree with fleet.

Events can be missed: a machine dies without running its units' ``ExecStopPost`` (the
announcement stays), a server crashed between registering a server and recording it. So
every ``interval`` seconds one pass refreshes the server's observed view of fleet
(:class:`FleetView`: units, unit states, machines, read in full once per pass; requests read
it per service), reads the announcements and the router's servers of every service (one paged
read each), and:

- removes an announcement whose unit is gone from fleet, whose machine left the cluster, whose
  unit fleet moved to another machine, or whose unit systemd reports ``failed``/``inactive``
  there. Removing it is enough: the instances watch withdraws the instance and deregisters it.
  The delete compares the value, so a fresh announcement under the same key is never lost.
- deregisters a router server that no announcement stands behind.

With several servers, each reconciles only the services it owns (``owns``: the ownership
policy of ``handlers/owners.py``), so every service is reaped by one server.

A finding is acted on only when two passes in a row agree, so a unit caught between two
states is left alone. A pass that cannot read fleet or etcd changes nothing. After the first
full pass the server's settled heap is frozen out of the cyclic garbage collector's reach
(``gc.freeze``).

It also keeps the deploy history short: after each deploy of a service, and on every pass,
only the ``keep`` newest finished deploys are kept, and always the live release and the one a
rollback would return to; unfinished deploys are never touched.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from typing import NamedTuple, TypeVar

import structlog

from deployster.aio import cancel_and_wait
from deployster.bus import EventBus
from deployster.errors import is_temporary
from deployster.events import DeployFailed, DeploySucceeded
from deployster.fleet import FleetClient, FleetNotFoundError, Machine, UnitState
from deployster.keys import parse_announce_key
from deployster.naming import UnitName
from deployster.records import DeployRecord, DeploySummary
from deployster.releases import live_release, rollback_target
from deployster.routers import Router
from deployster.store import Store
from deployster.supervise import start_supervised
from deployster.units import Announcement

log = structlog.get_logger(__name__)

# Items a pass handles between two yields to the event loop: a few milliseconds of work.
YIELD_EVERY = 500
# Requests to fleet in flight at once when the view reads single units.
READ_THROUGH_CONCURRENCY = 8


class Announced(NamedTuple):
    """One announcement as etcd holds it now (what a pass needs of it: few objects each)."""

    key: str
    raw: str
    unit: UnitName
    machine: str  # the machine the instance announced itself on


class ObservedState(NamedTuple):
    """What systemd reports of a unit on one machine, as fleet last showed it."""

    machine_id: str
    load_state: str
    active_state: str
    sub_state: str


class ObservedUnit(NamedTuple):
    """One managed unit as fleet last showed it: its job states, its machine and systemd's
    states of it (not its options)."""

    name: str
    desired_state: str
    current_state: str
    machine_id: str
    states: tuple[ObservedState, ...] = ()


# How the view keeps a unit: ObservedUnit's fields as a plain tuple, its states plain tuples of
# ObservedState's fields. The cyclic garbage collector stops tracking a plain tuple of strings
# at its first collection, so that 10,000 units add nothing to a full collection's walk (a
# named tuple stays tracked).
_State = tuple[str, str, str, str]
_Row = tuple[str, str, str, str, tuple[_State, ...]]


def _observed(row: _Row) -> ObservedUnit:
    return ObservedUnit(*row[:4], tuple(ObservedState._make(state) for state in row[4]))


def _state_row(state: UnitState) -> _State:
    return (state.machine_id, state.load_state, state.active_state, state.sub_state)


class FleetView:
    """The server's one observed view of fleet: every managed unit with its states, by
    service, and the machines; what requests read instead of listing the whole fleet.

    A full read (:meth:`refresh`: every unit, unit state and machine, page by page, as rows
    without the units' options) replaces it; the reaper's pass does one, and the first reader
    of a view never filled waits for one. ``observed_at`` is when the last full read began
    (epoch seconds): the view is at least that fresh. Between full reads, Deployster's own
    changes and its reads of single units (:meth:`read_through`, :meth:`read_states`,
    :meth:`forget`) update it at once, and a full read that was under way meanwhile keeps
    them. Units created by hand (``fleetctl``) since the last full read are not in it.
    """

    def __init__(self) -> None:
        self._services: dict[str, dict[str, _Row]] = {}
        self.machine_ids: frozenset[str] = frozenset()  # full ids and 8-character short ids
        self.observed_at: float | None = None
        # Changes made while a full read runs, replayed onto its result: (service, name, row
        # or None for gone).
        self._changes: list[tuple[str, str, _Row | None]] | None = None
        self._reading: asyncio.Future[None] | None = None

    # -- reading -------------------------------------------------------------------------

    def units_of(self, service: str) -> list[tuple[UnitName, ObservedUnit]]:
        """The service's units in fleet's order (by name)."""
        found = []
        for name, row in sorted(self._services.get(service, {}).items()):
            parsed = UnitName.parse(name)
            if parsed is not None:
                found.append((parsed, _observed(row)))
        return found

    def unit(self, name: UnitName) -> ObservedUnit | None:
        row = self._services.get(name.service, {}).get(str(name))
        return None if row is None else _observed(row)

    def age(self) -> float | None:
        """Seconds since the last full read began; None before the first one."""
        return None if self.observed_at is None else max(0.0, time.time() - self.observed_at)

    # -- full reads ----------------------------------------------------------------------

    async def load(
        self,
        unit_rows: AsyncIterable[Sequence[tuple[str, ...]]],
        state_rows: AsyncIterable[Sequence[tuple[str, ...]]],
        machines: Iterable[Machine],
        observed_at: float,
    ) -> None:
        """Replace the view with a full listing read from ``observed_at`` on: pages of
        ``FleetClient.unit_rows`` and ``state_rows``, read side by side."""
        # A unit's service, from the view being replaced: most names were parsed before.
        known = {name: service for service, units in self._services.items() for name in units}

        async def read_units() -> list[tuple[str, ...]]:
            return [row async for page in unit_rows for row in page]

        async def read_states() -> dict[str, list[_State]]:
            found: dict[str, list[_State]] = {}
            async for page in state_rows:
                for row in page:
                    found.setdefault(row[0], []).append(row[1:])  # type: ignore[arg-type]
            return found

        units, states = await asyncio.gather(read_units(), read_states())
        services: dict[str, dict[str, _Row]] = {}
        for n, (name, desired, current, machine) in enumerate(units, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            service = known.get(name)
            if service is None:
                parsed = UnitName.parse(name)
                if parsed is None:
                    continue  # not a unit Deployster manages
                service = parsed.service
            row = (name, desired, current, machine, tuple(states.get(name, ())))
            services.setdefault(service, {})[name] = row
        for service, name, changed in self._changes or ():
            if changed is None:
                services.get(service, {}).pop(name, None)
            else:
                services.setdefault(service, {})[name] = changed
        self._services = services
        self.machine_ids = frozenset(i for m in machines for i in (m.id, m.short_id()))
        self.observed_at = observed_at

    async def refresh(self, fleet: FleetClient) -> None:
        """One full read of fleet; a caller that comes while one runs waits for that one.
        FleetError when fleet does not answer (the view stays as it was)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read(fleet))
        reading = self._reading
        try:
            await asyncio.shield(reading)
        finally:
            if reading.done() and self._reading is reading:
                self._reading = None

    async def ensure(self, fleet: FleetClient) -> None:
        """A full read, unless the view had one already."""
        if self.observed_at is None:
            await self.refresh(fleet)

    async def _read(self, fleet: FleetClient) -> None:
        started = time.time()
        self._changes = []
        try:
            machines = await fleet.list_machines()
            await self.load(fleet.unit_rows(), fleet.state_rows(), machines, started)
        finally:
            self._changes = None

    # -- single units --------------------------------------------------------------------

    def _set(self, name: str, row: _Row | None) -> None:
        parsed = UnitName.parse(name)
        if parsed is None:
            return
        if self._changes is not None:
            self._changes.append((parsed.service, name, row))
        if row is None:
            self._services.get(parsed.service, {}).pop(name, None)
        else:
            self._services.setdefault(parsed.service, {})[name] = row

    def _states_of(self, name: str) -> tuple[_State, ...]:
        parsed = UnitName.parse(name)
        row = self._services.get(parsed.service, {}).get(name) if parsed is not None else None
        return () if row is None else row[4]

    def forget(self, names: Iterable[str]) -> None:
        """These units are gone (Deployster destroyed them, or fleet said 404)."""
        for name in names:
            self._set(name, None)

    async def read_through(self, fleet: FleetClient, names: Iterable[str]) -> set[str]:
        """Ask fleet for each of these units (``GET /units/{name}``, a few at a time), update
        the view with the answers and return the names that exist: exact for these names,
        without listing the fleet. FleetError when fleet does not answer."""

        async def one(name: str) -> None:
            async with limit:
                try:
                    unit = await fleet.get_unit(name)
                except FleetNotFoundError:
                    self._set(name, None)
                    return
            head = (unit.name, unit.desired_state, unit.current_state, unit.machine_id)
            self._set(name, (*head, self._states_of(name)))
            found.add(name)

        limit = asyncio.Semaphore(READ_THROUGH_CONCURRENCY)
        found: set[str] = set()
        await asyncio.gather(*(one(n) for n in dict.fromkeys(names)))
        return found

    async def read_states(self, fleet: FleetClient, names: Iterable[str]) -> list[UnitState]:
        """Ask fleet for the states of each of these units (``GET /state?unitName=``), update
        the view's states of the units it holds and return them. FleetError when fleet does
        not answer."""

        async def one(name: str) -> list[UnitState]:
            async with limit:
                states = await fleet.list_states(unit_name=name)
            parsed = UnitName.parse(name)
            row = self._services.get(parsed.service, {}).get(name) if parsed else None
            if row is not None:
                self._set(name, (*row[:4], tuple(map(_state_row, states))))
            return states

        limit = asyncio.Semaphore(READ_THROUGH_CONCURRENCY)
        answers = await asyncio.gather(*(one(n) for n in dict.fromkeys(names)))
        return [state for states in answers for state in states]


def stale_reason(found: Announced, fleet: FleetView) -> str | None:
    """Why this announcement no longer stands for a running instance, or None if it does."""
    name = str(found.unit)
    machine = found.machine
    unit = fleet.unit(found.unit)
    if unit is None:
        return f"unit {name} is gone from fleet"
    if machine not in fleet.machine_ids:
        return f"machine {machine} left the cluster"
    if unit.machine_id and unit.machine_id[:8] != machine[:8]:  # fleet's short ids match too
        return f"fleet moved unit {name} to machine {unit.machine_id}"
    state = next((s for s in unit.states if s.machine_id == machine), None)
    if state is not None and state.active_state in ("failed", "inactive"):
        return f"unit {name} is {state.active_state} on machine {machine}"
    return None


_R = TypeVar("_R", DeployRecord, DeploySummary)


def prunable(records: Sequence[_R], keep: int) -> list[_R]:
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
        view: FleetView,
        store: Store,
        router: Router,
        prefix: str,
        interval: float = 30.0,
        keep: int = 10,
        owns: Callable[[str], bool] = lambda service: True,
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.view = view
        self.store = store
        self.router = router
        self.prefix = prefix
        self.interval = interval
        self.keep = keep
        self.owns = owns  # which services this server reaps (by default, every one)
        # What the previous pass found: acted on when this pass finds it again.
        self._suspects: set[str] = set()
        self._known: dict[str, Announced] = {}  # the last pass's announcements, decoded
        self._heap_frozen = False  # gc.freeze() after the first full pass
        self._task: asyncio.Task[None] | None = None

    def register(self) -> None:
        self.bus.subscribe(DeploySucceeded, self.on_deploy_finished)
        self.bus.subscribe(DeployFailed, self.on_deploy_finished)

    async def start(self) -> None:
        self._task = start_supervised("reaper", self._loop)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self._heap_frozen:
            gc.unfreeze()  # what the stopped server leaves goes back to the collector
            self._heap_frozen = False

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
                # The services and their record counts from the deploy keys alone: records are
                # read only for a service with more than ``keep`` of them.
                counts = {
                    s: n for s, n in (await self.store.deploy_counts()).items() if self.owns(s)
                }
                await self.reconcile(set(counts))
                for service in sorted(s for s, n in counts.items() if n > self.keep):
                    await self.prune(service)
            except Exception as exc:
                if not is_temporary(exc):
                    raise  # the supervisor logs it and starts the loop again
                log.warning("reconcile_skipped", reason=str(exc))

    # -- history -------------------------------------------------------------------------

    async def prune(self, service: str) -> int:
        """Delete the service's old deploy records; returns how many."""
        return await self._prune(await self.store.deploy_summaries(service))

    async def _prune(self, records: list[DeploySummary]) -> int:
        """Delete what ``prunable`` picks among one service's ``records``."""
        doomed = prunable(records, self.keep)
        if doomed:
            await self.store.delete_deploys(doomed)
            log.info("deploy_history_pruned", deploys=[f"{r.service}/{r.id}" for r in doomed])
        return len(doomed)

    # -- reconcile -----------------------------------------------------------------------

    async def reconcile(self, services: set[str]) -> list[str]:
        """One pass over the announcements and over the router servers of ``services`` (and of
        every announced service), those this server owns; returns what it did, one sentence
        each."""
        # Three reads side by side: while one waits for fleet, another decodes etcd's answer.
        _, announcements, registered = await asyncio.gather(
            self.view.refresh(self.fleet), self._announced(), self.router.all_server_ids()
        )
        announced = [a for a in announcements if self.owns(a.unit.service)]
        services = {s for s in services if self.owns(s)}
        stale = {}
        for n, found in enumerate(announced, 1):
            reason = stale_reason(found, self.view)
            if reason is not None:
                stale[f"announcement:{found.key}:{found.raw}"] = (found, reason)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let requests in: a pass never holds the loop for long
        backed = {(a.unit.service, a.unit.container) for a in announced}
        orphans = {}
        for service in sorted(services | {a.unit.service for a in announced}):
            for server_id in registered.get(service, ()):
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
        if not self._heap_frozen:
            # The server has settled: it has read its records, fleet and every announcement,
            # and runs a prober per instance. That long-lived heap (hundreds of thousands of
            # objects at 10,000 instances) goes into the collector's permanent generation, so
            # a full collection no longer walks it (it held the loop for about 0.4 s there).
            # Frozen objects are still freed by reference counting; only cycles among them
            # that become garbage later stay, at most the size of the heap frozen, once. The
            # garbage of the start is collected first (one full collection, once), so that it
            # is not frozen for good.
            gc.collect()
            gc.freeze()
            self._heap_frozen = True
        return done

    async def _announced(self) -> list[Announced]:
        """Every announcement now. One that has not changed since the last pass is not
        decoded again (most of them: an announcement is written once per instance)."""
        found, known = [], dict[str, Announced]()
        for n, (key, raw) in enumerate((await self.store.announcements()).items(), 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            same = self._known.get(key)
            if same is not None and same.raw == raw:
                found.append(known.setdefault(key, same))
                continue
            unit = parse_announce_key(self.prefix, key)
            if unit is None:
                continue
            try:
                announcement = Announcement.model_validate_json(raw)
            except ValueError:
                continue
            found.append(known.setdefault(key, Announced(key, raw, unit, announcement.machine)))
        self._known = known
        return found
