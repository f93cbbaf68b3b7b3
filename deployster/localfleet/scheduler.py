"""Placement: fleet's engine and the agents' choice of units, as pure functions.

Two decisions, ported from fleet (`engine/reconciler.go`, `engine/scheduler.go`,
`agent/state.go`, `agent/reconcile.go`):

1. `reconcile_schedule` (the engine) gives each non-global unit a target
   machine. A placed unit stays where it is unless its desired state is
   `inactive`, its machine is gone, or that machine can no longer run it
   (`able_to_run`); an unplaced unit whose desired state is not `inactive`
   goes to the least-loaded machine able to run it, ties broken by machine id.
   A unit that fits nowhere stays unplaced (`currentState` `inactive`), as in
   fleet. `Replaces` moves the replaced unit to another machine.
2. `machine_units` (an agent) lists the units one machine should have loaded:
   the non-global units placed there and the global units whose metadata
   matches, minus those that conflict with a unit listed before them (in name
   order).

fleet's engine runs every 2 s and places at most what one pass allows, so a
`MachineOf` follower lands one pass after its peer; here passes repeat until
nothing changes, so the answer is the one fleet reaches a few passes later.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence

from deployster.fleet import JOB_INACTIVE, Machine

from .xfleet import Requirements, glob_match


@dataclasses.dataclass(frozen=True)
class SchedulableUnit:
    """What placement needs to know about a unit: its name, desired state and X-Fleet requirements."""

    name: str
    desired_state: str
    requirements: Requirements

    @property
    def is_global(self) -> bool:
        return self.requirements.is_global


def _literal_start(glob: str) -> str:
    """The part of a glob before its first special character: every name it matches starts so."""
    end = len(glob)
    for special in "*?[\\":
        at = glob.find(special)
        if at != -1:
            end = min(end, at)
    return glob[:end]


class _GlobIndex:
    """The Conflicts (or Replaces) globs of a set of units, by literal start: the globs that can
    match a name are found by looking its prefixes up, not by trying every glob."""

    def __init__(self) -> None:
        self._by_start: dict[str, dict[str, set[str]]] = {}  # start -> glob -> unit names

    def add(self, unit: str, globs: Iterable[str]) -> None:
        for glob in globs:
            self._by_start.setdefault(_literal_start(glob), {}).setdefault(glob, set()).add(unit)

    def remove(self, unit: str, globs: Iterable[str]) -> None:
        for glob in globs:
            start = _literal_start(glob)
            holders = self._by_start[start][glob]
            holders.discard(unit)
            if not holders:
                del self._by_start[start][glob]
                if not self._by_start[start]:
                    del self._by_start[start]

    def holders(self, name: str) -> set[str]:
        """The units with a glob that matches ``name``."""
        found: set[str] = set()
        for end in range(len(name) + 1):
            for glob, units in self._by_start.get(name[:end], {}).items():
                if glob_match(glob, name):
                    found |= units
        return found


class UnitSet(dict[str, SchedulableUnit]):
    """Units by name, indexed for the Conflicts and Replaces checks, so that checking one unit
    against ten thousand looks at a few of them: the units' own globs are indexed by their
    literal start (`web@*` -> `web@`), and the names a glob can match are found in the sorted
    names."""

    def __init__(self, units: Iterable[SchedulableUnit] = ()) -> None:
        super().__init__()
        self.conflicts = _GlobIndex()
        self.replaces = _GlobIndex()
        self._sorted: list[str] | None = None
        for unit in units:
            self.add(unit)

    def add(self, unit: SchedulableUnit) -> None:
        self.discard(unit.name)
        self[unit.name] = unit
        self.conflicts.add(unit.name, unit.requirements.conflicts)
        self.replaces.add(unit.name, unit.requirements.replaces)
        self._sorted = None

    def discard(self, name: str) -> None:
        unit = self.pop(name, None)
        if unit is not None:
            self.conflicts.remove(name, unit.requirements.conflicts)
            self.replaces.remove(name, unit.requirements.replaces)
            self._sorted = None

    def matching(self, glob: str) -> list[SchedulableUnit]:
        """The units whose name `glob` matches."""
        start = _literal_start(glob)
        if start == glob:
            unit = self.get(glob)
            return [unit] if unit is not None else []
        if self._sorted is None:
            self._sorted = sorted(self)
        found = []
        for name in self._sorted[bisect.bisect_left(self._sorted, start) :]:
            if not name.startswith(start):
                break
            if glob_match(glob, name):
                found.append(self[name])
        return found


class Action(enum.Enum):
    SCHEDULE = "schedule"
    UNSCHEDULE = "unschedule"
    RESCHEDULE = "reschedule"


@dataclasses.dataclass
class AgentView:
    """One machine as the engine sees it: the units it has (placed or global)."""

    machine: Machine
    units: UnitSet = dataclasses.field(default_factory=UnitSet)


def has_metadata(machine: Machine, required: Mapping[str, frozenset[str]]) -> bool:
    """Every required key is set on the machine to one of the accepted values."""
    return all(machine.metadata.get(key) in accepted for key, accepted in required.items())


def has_conflict(units: UnitSet, name: str, conflicts: Sequence[str]) -> bool:
    """A unit conflicts with one of `units` if either side's Conflicts glob matches the other's name."""
    if units.conflicts.holders(name) - {name}:
        return True
    return any(other.name != name for glob in conflicts for other in units.matching(glob))


def replaced_unit(units: UnitSet, name: str, replaces: Sequence[str]) -> str | None:
    """The unit among `units` that `name` replaces or is replaced by (not both: fleet skips cycles)."""
    candidates = {other.name: other for glob in replaces for other in units.matching(glob)}
    candidates.update((other, units[other]) for other in units.replaces.holders(name))
    # In the order a view is built in: placed units by name, then global ones by name.
    for other in sorted(candidates.values(), key=lambda unit: (unit.is_global, unit.name)):
        if other.name == name:
            continue
        we_replace = any(glob_match(glob, other.name) for glob in replaces)
        it_replaces = any(glob_match(glob, name) for glob in other.requirements.replaces)
        if we_replace != it_replaces:
            return other.name
    return None


def able_to_run(agent: AgentView, unit: SchedulableUnit) -> Action:
    """fleet's `AgentState.AbleToRun`."""
    wanted = unit.requirements.machine_id
    if wanted is not None and not agent.machine.matches_id(wanted):
        return Action.UNSCHEDULE
    if not has_metadata(agent.machine, unit.requirements.metadata):
        return Action.UNSCHEDULE
    if any(peer not in agent.units for peer in unit.requirements.peers):
        return Action.UNSCHEDULE
    if has_conflict(agent.units, unit.name, unit.requirements.conflicts):
        return Action.UNSCHEDULE
    if replaced_unit(agent.units, unit.name, unit.requirements.replaces) is not None:
        return Action.RESCHEDULE
    return Action.SCHEDULE


class _ClusterState:
    """Units, machines and targets during one reconcile; agent views are rebuilt after each move."""

    def __init__(
        self,
        units: Sequence[SchedulableUnit],
        machines: Sequence[Machine],
        targets: Mapping[str, str | None],
    ) -> None:
        ordered = sorted(units, key=lambda unit: unit.name)
        self.jobs = [unit for unit in ordered if not unit.is_global]
        self.globals = [unit for unit in ordered if unit.is_global]
        self.machines = sorted(machines, key=lambda machine: machine.id)
        self.targets: dict[str, str | None] = {
            unit.name: targets.get(unit.name) for unit in self.jobs
        }
        self._agents: dict[str, AgentView] | None = None
        self._placed: dict[str, str] = {}  # unit -> the agent whose view holds it
        self._jobs_by_name = {job.name: job for job in self.jobs}

    def agents(self) -> dict[str, AgentView]:
        if self._agents is None:
            agents = {machine.id: AgentView(machine) for machine in self.machines}
            self._placed = {}
            for job in self.jobs:
                target = self.targets[job.name]
                if target in agents and job.desired_state != JOB_INACTIVE:
                    agents[target].units.add(job)
                    self._placed[job.name] = target
            for unit in self.globals:
                for agent in agents.values():
                    if has_metadata(agent.machine, unit.requirements.metadata) and not has_conflict(
                        agent.units, unit.name, unit.requirements.conflicts
                    ):
                        agent.units.add(unit)
            self._agents = agents
        return self._agents

    def sorted_agents(self) -> list[AgentView]:
        """Least loaded first, ties by machine id (fleet's `leastLoadedScheduler`)."""
        return sorted(
            self.agents().values(), key=lambda agent: (len(agent.units), agent.machine.id)
        )

    def place(self, name: str, machine_id: str | None) -> None:
        self.targets[name] = machine_id
        if self._agents is None:
            return
        if self.globals:  # where a global unit goes depends on the others: start again
            self._agents = None
            return
        # Without global units, a move changes two views only.
        previous = self._placed.pop(name, None)
        if previous is not None:
            self._agents[previous].units.discard(name)
        job = self._jobs_by_name[name]
        if machine_id in self._agents and job.desired_state != JOB_INACTIVE:
            self._agents[machine_id].units.add(job)
            self._placed[name] = machine_id


def reconcile_schedule(
    units: Sequence[SchedulableUnit], machines: Sequence[Machine], targets: Mapping[str, str | None]
) -> dict[str, str | None]:
    """The target machine of every non-global unit after the engine has reconciled."""
    cluster = _ClusterState(units, machines, targets)
    # Each pass moves at least one unit or ends; the bound only stops the
    # oscillation fleet itself shows with some Replaces setups.
    for _ in range(len(cluster.jobs) + 2):
        if not _reconcile_pass(cluster):
            break
    return cluster.targets


def _reconcile_pass(cluster: _ClusterState) -> bool:
    changed = False
    for job in cluster.jobs:
        target = cluster.targets[job.name]
        if target is None:
            continue
        agent = cluster.agents().get(target)
        if job.desired_state == JOB_INACTIVE or agent is None:
            cluster.place(job.name, None)
            changed = True
            continue
        action = able_to_run(agent, job)
        if action is Action.RESCHEDULE and _move_replaced_unit(cluster, job, agent):
            changed = True
        elif action is Action.UNSCHEDULE:
            cluster.place(job.name, None)
            changed = True
    for job in cluster.jobs:
        if cluster.targets[job.name] is not None or job.desired_state == JOB_INACTIVE:
            continue
        for agent in cluster.sorted_agents():
            if able_to_run(agent, job) is not Action.UNSCHEDULE:
                cluster.place(job.name, agent.machine.id)
                changed = True
                break
    return changed


def _move_replaced_unit(cluster: _ClusterState, job: SchedulableUnit, agent: AgentView) -> bool:
    """fleet's `handle_reschedule`: the replaced unit leaves for the least-loaded other machine."""
    replaced = replaced_unit(agent.units, job.name, job.requirements.replaces)
    if replaced is None or replaced not in cluster.targets:
        return False  # a global unit cannot be moved
    cluster.place(replaced, None)
    for other in cluster.sorted_agents():
        if other.machine.id != agent.machine.id:
            cluster.place(replaced, other.machine.id)
            return True
    return True


def machine_units(
    units: Sequence[SchedulableUnit], targets: Mapping[str, str | None], machine: Machine
) -> list[SchedulableUnit]:
    """The units the agent of `machine` should have loaded (fleet's `desiredAgentState`)."""
    chosen = UnitSet()
    for unit in sorted(units, key=lambda unit: unit.name):
        if unit.is_global:
            if not has_metadata(machine, unit.requirements.metadata):
                continue
        elif targets.get(unit.name) != machine.id:
            continue
        if has_conflict(chosen, unit.name, unit.requirements.conflicts):
            continue
        chosen.add(unit)
    return list(chosen.values())
