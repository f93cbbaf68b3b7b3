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

The two functions look at every unit; they are the definition. The registry
uses `Placement`, which gives the same answers kept up to date unit by unit
(so one PUT costs about the same among a hundred units or ten thousand), and
the property tests compare the two over random units and changes.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence

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
        self._lengths: dict[int, int] = {}  # length of a start -> how many starts have it

    def add(self, unit: str, globs: Iterable[str]) -> None:
        for glob in set(globs):
            start = _literal_start(glob)
            if start not in self._by_start:
                self._by_start[start] = {}
                self._lengths[len(start)] = self._lengths.get(len(start), 0) + 1
            self._by_start[start].setdefault(glob, set()).add(unit)

    def remove(self, unit: str, globs: Iterable[str]) -> None:
        for glob in set(globs):  # a unit may name one glob twice
            start = _literal_start(glob)
            holders = self._by_start[start][glob]
            holders.discard(unit)
            if not holders:
                del self._by_start[start][glob]
                if not self._by_start[start]:
                    del self._by_start[start]
                    self._lengths[len(start)] -= 1
                    if not self._lengths[len(start)]:
                        del self._lengths[len(start)]

    def holders(self, name: str) -> set[str]:
        """The units with a glob that matches ``name``."""
        found: set[str] = set()
        for end in self._lengths:  # the prefixes of `name` as long as a start
            globs = self._by_start.get(name[:end]) if end <= len(name) else None
            for glob, units in (globs or {}).items():
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
        self._sorted: list[str] = []  # the names, kept sorted as units come and go
        for unit in units:
            self.add(unit)

    def add(self, unit: SchedulableUnit) -> None:
        old = self.get(unit.name)
        if old is None:
            bisect.insort(self._sorted, unit.name)
        else:
            self._unindex(old)
        self[unit.name] = unit
        self.conflicts.add(unit.name, unit.requirements.conflicts)
        self.replaces.add(unit.name, unit.requirements.replaces)

    def discard(self, name: str) -> None:
        unit = self.pop(name, None)
        if unit is not None:
            self._unindex(unit)
            del self._sorted[bisect.bisect_left(self._sorted, name)]

    def _unindex(self, unit: SchedulableUnit) -> None:
        self.conflicts.remove(unit.name, unit.requirements.conflicts)
        self.replaces.remove(unit.name, unit.requirements.replaces)

    def matching(self, glob: str) -> list[SchedulableUnit]:
        """The units whose name `glob` matches."""
        start = _literal_start(glob)
        if start == glob:
            unit = self.get(glob)
            return [unit] if unit is not None else []
        names = self._sorted
        found = []
        # Only the names that start with the glob's literal start, found by bisection.
        for at in range(bisect.bisect_left(names, start), len(names)):
            name = names[at]
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


def _conflicting(units: UnitSet, unit: SchedulableUnit) -> set[str]:
    """The units of `units` that `unit` conflicts with, either way (itself among them if it is
    there and its own Conflicts match its name)."""
    found = units.conflicts.holders(unit.name)
    for glob in unit.requirements.conflicts:
        found.update(other.name for other in units.matching(glob))
    return found


def _related(units: UnitSet, peers: Mapping[str, set[str]], unit: SchedulableUnit) -> set[str]:
    """The units of `units` whose placement can change when `unit` comes to or leaves a machine:
    those naming it in MachineOf, and those it conflicts with or replaces, either way."""
    found = _conflicting(units, unit)
    found.update(peers.get(unit.name, ()))
    found |= units.replaces.holders(unit.name)
    for glob in unit.requirements.replaces:
        found.update(other.name for other in units.matching(glob))
    return found


@dataclasses.dataclass(frozen=True)
class PlacementChanges:
    moved: set[str]  # the units whose machine may have changed
    touched: set[tuple[str, str]]  # (unit, machine) pairs whose choice or unit may have changed


class Placement:
    """`reconcile_schedule` and `machine_units` kept up to date as units come and go, at a cost
    that depends on what a change touches, not on how many units there are.

    The answer is the one the plain functions give for the same units, machines and previous
    targets (the property tests compare them). The engine's passes are the same passes, in the
    same name order, but a pass visits only the units whose visit can change something: after
    a reconcile that ended (a pass changed nothing), a placed unit can run where it is and an
    unplaced one fits nowhere, and each stays so until a unit it is related to (`_related`)
    comes to or leaves its machine, or a machine's metadata changes. So a change marks the
    unit it changes, and every move marks the related units; a pass visits the marked units in
    name order, those marked behind it in the next pass, as the plain passes would find them.
    A reconcile cut short by its bound (fleet's Replaces oscillation) leaves no such guarantee:
    the next one visits every unit. The agents' choice (`machine_units`) is kept the same way:
    a unit is dropped when it conflicts with one chosen before it in name order, so a change
    marks the candidates after it that it conflicts with.
    """

    def __init__(self, machines: Sequence[Machine]) -> None:
        self._views = {
            machine.id: AgentView(machine) for machine in sorted(machines, key=lambda m: m.id)
        }
        self._units = UnitSet()  # every unit, for the related-unit lookups
        self._peers: dict[str, set[str]] = {}  # a MachineOf name -> the units naming it
        self._globals: list[str] = []  # sorted
        self._job_count = 0
        self.targets: dict[str, str | None] = {}  # every non-global unit's machine
        self._placed: dict[str, str] = {}  # unit -> the view that holds it
        self._dirty: set[str] = set()
        self._heap: list[str] | None = None  # the visit order of the phase under way
        self._cursor = ""
        self._visit_all = True  # the next reconcile visits every unit
        # The agents' choice: candidates (placed there or global and matching) and the chosen.
        self._candidates = {machine_id: UnitSet() for machine_id in self._views}
        self._chosen: dict[str, set[str]] = {machine_id: set() for machine_id in self._views}
        self._choice_dirty: dict[str, set[str]] = {machine_id: set() for machine_id in self._views}
        self._touched: set[tuple[str, str]] = set()
        self._moved: set[str] = set()

    # Changes

    def put(self, unit: SchedulableUnit, target: str | None) -> None:
        """Add a unit, or replace the one of that name; a non-global unit starts on `target`."""
        if unit.name in self._units:
            self.remove(unit.name)
        self._units.add(unit)
        for peer in unit.requirements.peers:
            self._peers.setdefault(peer, set()).add(unit.name)
        self._touch_everywhere(unit.name)
        if unit.is_global:
            bisect.insort(self._globals, unit.name)
            for machine_id in self._views:
                self._refresh_globals(machine_id)
            return
        self._job_count += 1
        self.targets[unit.name] = None
        self._place(unit.name, target)

    def remove(self, name: str) -> None:
        unit = self._units[name]
        if unit.is_global:
            del self._globals[bisect.bisect_left(self._globals, name)]
            for machine_id, agent in self._views.items():
                agent.units.discard(name)
                self._set_candidate(machine_id, unit, False)
                self._refresh_globals(machine_id)
            self._mark_related(unit)
        else:
            self._place(name, None)
            del self.targets[name]
            self._dirty.discard(name)
            self._job_count -= 1
        self._units.discard(name)
        for peer in unit.requirements.peers:
            self._peers[peer].discard(name)
            if not self._peers[peer]:
                del self._peers[peer]
        self._touch_everywhere(name)

    def set_machine(self, machine: Machine) -> None:
        """A machine's metadata changed: every unit may fit or not fit again."""
        if machine.id not in self._views:
            return
        self._views[machine.id].machine = machine
        self._visit_all = True
        self._refresh_globals(machine.id)

    # Reading

    def chosen(self, machine_id: str) -> set[str]:
        """The units the agent of `machine_id` should have loaded (`machine_units`)."""
        return self._chosen[machine_id]

    # The engine

    def reconcile(self) -> PlacementChanges:
        """Place the units as `reconcile_schedule` would, then update the agents' choice; what
        changed since the last reconcile."""
        if self._visit_all:
            self._dirty = set(self.targets)
            self._visit_all = False
        for _ in range(self._job_count + 2):
            if not self._reconcile_pass():
                break
        else:
            self._visit_all = True  # cut short: no unit is known to stay where it is
        for machine_id in self._views:
            self._choose(machine_id)
        changes = PlacementChanges(self._moved, self._touched)
        self._moved, self._touched = set(), set()
        return changes

    def _reconcile_pass(self) -> bool:
        changed = False
        for name in self._in_name_order():
            target = self.targets[name]
            job = self._units[name]
            if target is None:
                if job.desired_state == JOB_INACTIVE:
                    self._dirty.discard(name)
                continue  # an unplaced unit is visited by the second phase
            self._dirty.discard(name)
            agent = self._views.get(target)
            if job.desired_state == JOB_INACTIVE or agent is None:
                self._place(name, None)
                changed = True
                continue
            action = able_to_run(agent, job)
            if action is Action.RESCHEDULE and self._move_replaced_unit(job, agent):
                changed = True
            elif action is Action.UNSCHEDULE:
                self._place(name, None)
                changed = True
        for name in self._in_name_order():
            job = self._units[name]
            if self.targets[name] is not None:
                continue  # visited by the next pass's first phase
            self._dirty.discard(name)
            if job.desired_state == JOB_INACTIVE:
                continue
            for agent in self._sorted_agents():
                if able_to_run(agent, job) is not Action.UNSCHEDULE:
                    self._place(name, agent.machine.id)
                    changed = True
                    break
        return changed

    def _in_name_order(self) -> Iterator[str]:
        """The marked units in name order, including those marked after the cursor meanwhile."""
        self._heap = sorted(self._dirty)
        self._cursor = ""
        try:
            while self._heap:
                name = heapq.heappop(self._heap)
                if name <= self._cursor:
                    continue  # marked twice
                self._cursor = name
                if name in self._dirty:
                    yield name
        finally:
            self._heap = None

    def _sorted_agents(self) -> list[AgentView]:
        return sorted(self._views.values(), key=lambda agent: (len(agent.units), agent.machine.id))

    def _move_replaced_unit(self, job: SchedulableUnit, agent: AgentView) -> bool:
        replaced = replaced_unit(agent.units, job.name, job.requirements.replaces)
        if replaced is None or replaced not in self.targets:
            return False
        self._place(replaced, None)
        for other in self._sorted_agents():
            if other.machine.id != agent.machine.id:
                self._place(replaced, other.machine.id)
                return True
        return True

    def _place(self, name: str, machine_id: str | None) -> None:
        previous_target = self.targets[name]
        self.targets[name] = machine_id
        self._mark(name)
        job = self._units[name]
        previous = self._placed.pop(name, None)
        if previous is not None:
            self._views[previous].units.discard(name)
            self._moved_in_view(previous, job)
        if machine_id in self._views and job.desired_state != JOB_INACTIVE:
            self._views[machine_id].units.add(job)
            self._placed[name] = machine_id
            self._moved_in_view(machine_id, job)
        if previous_target != machine_id:
            self._moved.add(name)
            for machine in (previous_target, machine_id):
                if machine in self._candidates:
                    self._set_candidate(machine, job, machine == machine_id)

    def _moved_in_view(self, machine_id: str, unit: SchedulableUnit) -> None:
        self._mark_related(unit)
        self._refresh_globals(machine_id)

    def _refresh_globals(self, machine_id: str) -> None:
        """The global units a view holds, as fleet adds them: after the placed units, in name
        order, those whose metadata matches and that conflict with nothing added before."""
        if not self._globals:
            return
        agent = self._views[machine_id]
        before = {name for name in self._globals if name in agent.units}
        for name in self._globals:
            agent.units.discard(name)
        for name in self._globals:
            unit = self._units[name]
            matches = has_metadata(agent.machine, unit.requirements.metadata)
            if matches and not has_conflict(agent.units, name, unit.requirements.conflicts):
                agent.units.add(unit)
            self._set_candidate(machine_id, unit, matches)
        for name in before.symmetric_difference(n for n in self._globals if n in agent.units):
            self._mark_related(self._units[name])

    def _mark_related(self, unit: SchedulableUnit) -> None:
        if self._visit_all:
            return  # the next reconcile visits every unit anyway
        for name in _related(self._units, self._peers, unit):
            self._mark(name)

    def _mark(self, name: str) -> None:
        if name not in self.targets:
            return  # global units are not placed
        self._dirty.add(name)
        if self._heap is not None and name > self._cursor:
            heapq.heappush(self._heap, name)

    # The agents' choice

    def _touch_everywhere(self, name: str) -> None:
        self._touched.update((name, machine_id) for machine_id in self._views)

    def _set_candidate(self, machine_id: str, unit: SchedulableUnit, candidate: bool) -> None:
        candidates = self._candidates[machine_id]
        if candidate == (candidates.get(unit.name) is unit):
            return
        if candidate:
            candidates.add(unit)
        else:
            candidates.discard(unit.name)
        dirty = self._choice_dirty[machine_id]
        dirty.add(unit.name)
        dirty.update(_conflicting(candidates, unit))

    def _choose(self, machine_id: str) -> None:
        """`machine_units` for the marked candidates, in name order: a unit is chosen unless it
        conflicts with a unit chosen before it; a unit whose choice changes marks the
        candidates after it that it conflicts with."""
        candidates, chosen = self._candidates[machine_id], self._chosen[machine_id]
        heap = sorted(self._choice_dirty[machine_id])
        self._choice_dirty[machine_id] = set()
        cursor = ""
        while heap:
            name = heapq.heappop(heap)
            if name <= cursor:
                continue
            cursor = name
            unit = candidates.get(name)
            if unit is None:  # no longer a candidate: `_set_candidate` marked those after it
                if name in chosen:
                    chosen.discard(name)
                    self._touched.add((name, machine_id))
                continue
            conflicting = _conflicting(candidates, unit) - {name}
            now = not any(other < name and other in chosen for other in conflicting)
            if now == (name in chosen):
                continue
            if now:
                chosen.add(name)
            else:
                chosen.discard(name)
            self._touched.add((name, machine_id))
            for other in conflicting:
                if other > name:
                    heapq.heappush(heap, other)
