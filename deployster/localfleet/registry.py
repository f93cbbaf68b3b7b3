"""The registry: fleet's cluster state (etcd's `job/` and `machines/` keys) in memory.

It holds the submitted units (options, desired state, target machine) and the
machines, and it is the only writer of them. Every change goes through
`_commit`, which does what fleet's engine and agents would do next, at once
instead of on their 2 s and 5 s timers:

1. place units again (`scheduler.reconcile_schedule`);
2. save the units that changed (and those placement moved) if there is a
   state directory, in one transaction (`store.py`);
3. tell the listener (the agent) which units each machine should run, as
   `DesiredInstance`s keyed by `(unit name, machine id)`.

Everything runs on the event loop's thread, so no lock is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import structlog

from deployster.fleet import JOB_INACTIVE, JOB_LAUNCHED, Machine, UnitOption

from .model import DesiredInstance
from .scheduler import SchedulableUnit, machine_units, reconcile_schedule
from .store import RegistryStore, StoredUnit
from .unitfile import unit_hash
from .xfleet import Requirements, fleet_requirements

log = structlog.get_logger()

InstanceKey = tuple[str, str]
DesiredInstancesListener = Callable[[Mapping[InstanceKey, DesiredInstance]], None]


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
        self._store = store
        self._on_change = on_change

    def restore(self) -> None:
        """Load the saved registry, if any; nothing runs until `publish`."""
        stored = self._store.load() if self._store else None
        if stored is not None:
            self._metadata = {
                machine_id: dict(values) for machine_id, values in stored.machine_metadata.items()
            }
            for unit in stored.units:
                self._units[unit.name] = _record(
                    unit.name, unit.options, unit.desired_state, unit.target
                )
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
        return [
            machine.model_copy(update={"metadata": dict(self._metadata.get(machine.id, {}))})
            for machine in sorted(self._machines.values(), key=lambda machine: machine.id)
        ]

    def units(self) -> list[UnitRecord]:
        return [self._units[name] for name in sorted(self._units)]

    def unit(self, name: str) -> UnitRecord | None:
        return self._units.get(name)

    # Writing

    def put_unit(self, name: str, options: Sequence[UnitOption], desired_state: str) -> None:
        """Create a unit, or replace the options of an existing one (it keeps its machine)."""
        existing = self._units.get(name)
        self._units[name] = _record(
            name, options, desired_state, existing.target if existing else None
        )
        log.info(
            "unit_submitted" if existing is None else "unit_replaced",
            unit=name,
            desired_state=desired_state,
        )
        self._commit((name,))

    def set_desired_state(self, name: str, desired_state: str) -> None:
        self._units[name] = dataclasses.replace(self._units[name], desired_state=desired_state)
        log.info("unit_desired_state", unit=name, desired_state=desired_state)
        self._commit((name,))

    def destroy_unit(self, name: str) -> None:
        del self._units[name]
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
        self._commit((), {(machine_id, key): value})

    def _commit(
        self,
        changed: Sequence[str],
        metadata: Mapping[tuple[str, str], str | None] | None = None,
    ) -> None:
        moved = self._reschedule()
        if self._store is not None and (changed or moved or metadata):
            self._store.write({name: self._stored(name) for name in {*changed, *moved}}, metadata)
        self._on_change(self.desired_instances())

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

    def _reschedule(self) -> list[str]:
        """Place the units again; the names of those whose machine changed."""
        records = list(self._units.values())
        targets = reconcile_schedule(
            [record.schedulable() for record in records],
            self.machines(),
            {record.name: record.target for record in records},
        )
        moved = []
        for name, target in targets.items():
            record = self._units[name]
            if record.target != target:
                self._units[name] = dataclasses.replace(record, target=target)
                moved.append(name)
                log.info(
                    "unit_placed" if target else "unit_unplaced",
                    unit=name,
                    machine=target or record.target,
                )
        return moved

    def desired_instances(self) -> dict[InstanceKey, DesiredInstance]:
        schedulables = [record.schedulable() for record in self._units.values()]
        targets = {record.name: record.target for record in self._units.values()}
        desired: dict[InstanceKey, DesiredInstance] = {}
        for machine in self.machines():
            for unit in machine_units(schedulables, targets, machine):
                record = self._units[unit.name]
                if record.desired_state == JOB_INACTIVE:
                    continue
                desired[(record.name, machine.id)] = DesiredInstance(
                    unit_name=record.name,
                    machine_id=machine.id,
                    options=record.options,
                    unit_hash=record.hash,
                    launched=record.desired_state == JOB_LAUNCHED,
                )
        return desired
