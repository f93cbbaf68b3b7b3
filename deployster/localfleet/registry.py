"""The registry: fleet's cluster state (etcd's `job/` and `machines/` keys) in memory.

It holds the submitted units (options, desired state, target machine) and the
machines, and it is the only writer of them. Every change goes through
`_commit`, which does what fleet's engine and agents would do next, at once
instead of on their 2 s and 5 s timers:

1. place units again (`scheduler.Placement`, which visits only the units a
   change can move, so a PUT costs about the same with a hundred units or ten
   thousand);
2. save the units that changed (and those placement moved) if there is a
   state directory, in one transaction (`store.py`);
3. tell the listener (the agent) what changed in what each machine should
   run: `DesiredInstance`s keyed by `(unit name, machine id)`, None for one
   that should no longer run.

Unit names are also kept sorted, so that a page of the units listing costs a
page, not a sort of every unit.

Everything runs on the event loop's thread, so no lock is needed.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import structlog

from deployster.fleet import JOB_INACTIVE, JOB_LAUNCHED, Machine, UnitOption

from .model import DesiredInstance
from .scheduler import Placement, SchedulableUnit
from .store import RegistryStore, StoredUnit
from .unitfile import unit_hash
from .xfleet import Requirements, fleet_requirements

log = structlog.get_logger()

InstanceKey = tuple[str, str]
DesiredInstancesListener = Callable[[Mapping[InstanceKey, DesiredInstance | None]], None]


@dataclasses.dataclass(frozen=True)
class UnitRecord:
    """A submitted unit, as fleet keeps it under `job/<name>/`."""

    name: str
    options: tuple[UnitOption, ...]
    desired_state: str
    hash: str
    requirements: Requirements
    target: str | None = None

    @property
    def is_global(self) -> bool:
        return self.requirements.is_global

    def schedulable(self) -> SchedulableUnit:
        return SchedulableUnit(self.name, self.desired_state, self.requirements)


def _record(
    name: str, options: Sequence[UnitOption], desired_state: str, target: str | None
) -> UnitRecord:
    options = tuple(options)
    return UnitRecord(
        name=name,
        options=options,
        desired_state=desired_state,
        hash=unit_hash(options),
        requirements=fleet_requirements(options, unit_name=name),
        target=target,
    )


class Registry:
    def __init__(
        self,
        machines: Sequence[Machine],
        store: RegistryStore | None,
        on_change: DesiredInstancesListener,
    ) -> None:
        self._machines = {machine.id: machine for machine in machines}
        self._metadata: dict[str, dict[str, str]] = {}
        self._units: dict[str, UnitRecord] = {}
        self._names: list[str] = []  # sorted
        self._placement = Placement(machines)
        self._desired: dict[InstanceKey, DesiredInstance] = {}
        self._store = store
        self._on_change = on_change

    def restore(self) -> None:
        """Load the saved registry, if any; nothing runs until `publish`."""
        stored = self._store.load() if self._store else None
        if stored is not None:
            self._metadata = {
                machine_id: dict(values) for machine_id, values in stored.machine_metadata.items()
            }
            for machine in self.machines():
                self._placement.set_machine(machine)
            for unit in stored.units:
                self._set(_record(unit.name, unit.options, unit.desired_state, unit.target))
            log.info(
                "registry_restored",
                path=str(self._store.path) if self._store else None,
                units=len(self._units),
            )

    def publish(self) -> None:
        """Place the units and hand the agent what should run, as after any change."""
        self._commit(())

    # Reading

    def machines(self) -> list[Machine]:
        return [self._machine(machine_id) for machine_id in sorted(self._machines)]

    def _machine(self, machine_id: str) -> Machine:
        return self._machines[machine_id].model_copy(
            update={"metadata": dict(self._metadata.get(machine_id, {}))}
        )

    def unit_names(self) -> Sequence[str]:
        """Every unit's name, sorted; read it before the next change."""
        return self._names

    def unit(self, name: str) -> UnitRecord | None:
        return self._units.get(name)

    # Writing

    def put_unit(self, name: str, options: Sequence[UnitOption], desired_state: str) -> None:
        """Create a unit, or replace the options of an existing one (it keeps its machine)."""
        existing = self._units.get(name)
        self._set(_record(name, options, desired_state, existing.target if existing else None))
        log.info(
            "unit_submitted" if existing is None else "unit_replaced",
            unit=name,
            desired_state=desired_state,
        )
        self._commit((name,))

    def set_desired_state(self, name: str, desired_state: str) -> None:
        self._set(dataclasses.replace(self._units[name], desired_state=desired_state))
        log.info("unit_desired_state", unit=name, desired_state=desired_state)
        self._commit((name,))

    def destroy_unit(self, name: str) -> None:
        del self._units[name]
        del self._names[bisect.bisect_left(self._names, name)]
        self._placement.remove(name)
        log.info("unit_destroyed", unit=name)
        self._commit((name,))

    def set_machine_metadata(self, machine_id: str, key: str, value: str | None) -> None:
        """Set or (with None) remove one metadata key; like fleet, an unknown machine id is accepted."""
        metadata = self._metadata.setdefault(machine_id, {})
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
        log.info("machine_metadata", machine=machine_id, key=key, value=value)
        if machine_id in self._machines:
            self._placement.set_machine(self._machine(machine_id))
        self._commit((), {(machine_id, key): value})

    def _set(self, record: UnitRecord) -> None:
        if record.name not in self._units:
            bisect.insort(self._names, record.name)
        self._units[record.name] = record
        self._placement.put(record.schedulable(), record.target)

    def _commit(
        self,
        changed: Sequence[str],
        metadata: Mapping[tuple[str, str], str | None] | None = None,
    ) -> None:
        changes = self._placement.reconcile()
        moved = self._note_moves(changes.moved)
        if self._store is not None and (changed or moved or metadata):
            self._store.write({name: self._stored(name) for name in {*changed, *moved}}, metadata)
        self._on_change(self._desired_changes(changes.touched))

    def _note_moves(self, names: set[str]) -> list[str]:
        """Give the records placement moved their new machine; their names."""
        moved = []
        for name in sorted(names):
            record = self._units.get(name)
            target = self._placement.targets.get(name)
            if record is None or record.is_global or record.target == target:
                continue
            self._units[name] = dataclasses.replace(record, target=target)
            moved.append(name)
            log.info(
                "unit_placed" if target else "unit_unplaced",
                unit=name,
                machine=target or record.target,
            )
        return moved

    def _stored(self, name: str) -> StoredUnit | None:
        record = self._units.get(name)
        if record is None:
            return None
        return StoredUnit(
            name=record.name,
            options=record.options,
            desired_state=record.desired_state,
            target=record.target,
        )

    def _desired_changes(
        self, touched: set[InstanceKey]
    ) -> dict[InstanceKey, DesiredInstance | None]:
        """What each machine should run, for the pairs placement touched, where it changed."""
        changes: dict[InstanceKey, DesiredInstance | None] = {}
        for key in touched:
            goal = self._desired_instance(*key)
            if self._desired.get(key) == goal:
                continue
            changes[key] = goal
            if goal is None:
                del self._desired[key]
            else:
                self._desired[key] = goal
        return changes

    def _desired_instance(self, name: str, machine_id: str) -> DesiredInstance | None:
        record = self._units.get(name)
        if (
            record is None
            or record.desired_state == JOB_INACTIVE
            or name not in self._placement.chosen(machine_id)
        ):
            return None
        return DesiredInstance(
            unit_name=record.name,
            machine_id=machine_id,
            options=record.options,
            unit_hash=record.hash,
            launched=record.desired_state == JOB_LAUNCHED,
        )
