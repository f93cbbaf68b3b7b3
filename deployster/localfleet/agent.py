"""The agent: fleet's per-machine agent and systemd, for every machine, in one process.

The registry hands the agent what changed in the set of `DesiredInstance`s
(one per unit and machine) after every change (`apply`: a new goal, or None
for an instance no longer wanted). Each instance has one long-lived
asyncio task, a `UnitInstance`, that owns everything about that unit on that
machine and moves it one step at a time towards what is desired, re-reading
the goal after every step, so that a goal that changes in the middle of a slow
stop is honoured and never overtaken:

- not loaded, wanted          -> load (`loaded`/`inactive`/`dead`)
- loaded, hash differs        -> stop, unload, then load the new options
                                 (fleet's "unload and reload in place")
- wanted launched, not yet    -> start (a `ServiceRun`, see `service.py`)
- wanted loaded, was launched -> stop
- not wanted any more         -> stop, unload; the UnitState disappears and
                                 the task ends

As in fleet, "launched" is what the agent *did* (it called start), not what the
process does: a unit whose main process died stays `failed` with desired state
`launched`, and is started again only after a stop (desired `loaded`) and a new
start. There is no `Restart=`.

Processes run with localfleet's own environment as the base. systemd's manager
environment is nearly empty, but a user's `deployster up` needs PATH, HOME,
DOCKER_HOST or XDG_RUNTIME_DIR (podman) to reach the units, so they are passed
through; Environment= and EnvironmentFile= come on top.

Restarts: with a state directory, every process the agent starts carries a
mark in its environment (`LOCALFLEET_UNIT`: the registry's id, machine, unit,
unit hash, the step that started it; `service.ProcessMark`), set before it
runs its first instruction, and the agent notes in the registry's database
which process runs each launched unit (pid, start time, process groups) once
it runs. A localfleet killed without stopping its units (kill -9, a crash)
finds, when it starts again, what its predecessor left: the noted runs whose
main process still runs (same pid and start time), and every live process
carrying its registry's mark, in /proc. The mark covers every moment the
note does not: a process spawned but not noted yet, a note cut off while it
was written (one SQLite transaction: whole or absent), an ExecStartPost or
ExecStopPost still running, a stop halfway through. Each instance takes what
was left for it before it starts anything:

- a run of the options it is to launch whose main process still runs is
  adopted (`ServiceRun.adopt`) with the control processes of those options
  (an ExecStartPost still announcing the unit runs on): reported
  `active`/`running` at once, stopped as if this run had started it, never
  started twice;
- everything else (a run of other options, a run that had not reached its
  main process or was stopping (an ExecStop or ExecStopPost of it runs),
  processes that outlived their main process, the units no longer wanted or
  not launched) is stopped first: SIGTERM to its process groups, SIGKILL
  after 10 s, then its note is forgotten. Only then does the instance start
  the unit, so no two runs of one unit overlap.

A marked process that left its step's session (a daemon: podman's pause
process, an agent) is left alone, as a stop never reaches it either; it is
told from a step's own process by what its run had reached
(`collect_leftovers`).

Limits: a run killed between a stop's SIGTERM and its main process's end,
with no ExecStop, leaves no sign of its stop: it is adopted, and fails when
its main process ends. A process whose environment localfleet cannot read
(setuid) or that overwrites it (a process title) is found through the note
only: the main process's, never a control process's.

A noted run whose main process is gone (or whose pid now names another
process, started at another time) is forgotten, its groups never signalled:
a group's id may have been reused. An adopted process's output went through a
pipe to the previous localfleet: a write to it now gets a broken pipe
(SIGPIPE ends a process that does not ignore it).

Supervision: an exception inside an instance is logged with the unit and
machine, its processes are killed, the unit is reported `failed`, and the
instance keeps obeying later goals; the agent never stops because of one unit.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import structlog

from deployster.fleet import JOB_LAUNCHED, JOB_LOADED, UnitState

from .journal import UnitJournal
from .model import DesiredInstance
from .service import (
    MarkedProcess,
    ProcessMark,
    ServiceRun,
    marked_processes,
    process_start_time,
    stop_groups,
)
from .store import RegistryStore, StoredRun
from .unitfile import ServiceSpec, UnitLoadError, build_service_spec

log = structlog.get_logger()

InstanceKey = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class _LoadedUnit:
    hash: str
    spec: ServiceSpec | None
    load_error: str | None


@dataclasses.dataclass
class _Activation:
    run: ServiceRun
    stop_requested: asyncio.Event
    task: asyncio.Task[None]


@dataclasses.dataclass
class Leftover:
    """Processes a previous localfleet started for one instance and left running: one run's
    main process (pid and start time; None when it is gone or was never started) and the
    process groups that go with it."""

    unit_hash: str
    main: tuple[int, int] | None
    groups: set[int]
    stopping: bool = False  # an ExecStop or ExecStopPost of it runs: never adopted
    noted: bool = False  # it had reached active/running


def collect_leftovers(
    noted: Iterable[StoredRun], marked: Iterable[MarkedProcess]
) -> dict[InstanceKey, list[Leftover]]:
    """What a previous localfleet left running, by instance: the noted runs (their main process
    checked alive), then a run for the oldest marked main process of each unit hash not noted.

    The processes that lead their own process group are the ones localfleet spawned, or ones
    that left their step's session (a daemon: podman's pause process, an agent); those are
    not the unit's, as a stop never reaches them either. They are told apart by what the run
    had reached: a main process other than the run's (younger: it descends from it), an
    ExecStartPre when the run has its main process, an ExecStartPost when it had reached
    active/running, have left a step that was over. The processes in their groups are left
    alone too. Any other marked process joins the run of its process group; a control process
    (ExecStartPost...) otherwise joins the run of its unit hash, which is stopping if that
    process is an ExecStop or ExecStopPost; what is left is a run without a main process (a
    main process's children that outlived it, a start that had not reached it)."""
    found: dict[InstanceKey, list[Leftover]] = {}
    for run in noted:
        found.setdefault((run.unit, run.machine_id), []).append(
            Leftover(run.unit_hash, (run.pid, run.start_time), set(run.groups), noted=True)
        )
    escaped: set[int] = set()
    for process in sorted(marked, key=_leaders_first):
        mark = process.mark
        runs = found.setdefault((mark.unit, mark.machine_id), [])
        own = next((run for run in runs if run.unit_hash == mark.unit_hash and run.main), None)
        if process.group in escaped or (own is not None and _left_its_step(process, own)):
            escaped.add(process.group)
            continue
        if process.leads and own is None:
            main = (process.pid, process.start_time)
            runs.append(Leftover(mark.unit_hash, main, {process.group}))
            continue
        home = next((run for run in runs if process.group in run.groups), None)
        if home is None and not process.main:
            home = own or next((run for run in runs if run.unit_hash == mark.unit_hash), None)
        if home is None:
            home = Leftover(mark.unit_hash, None, set())
            runs.append(home)
        home.groups.add(process.group)
        home.stopping |= process.stopping
    return found


def _leaders_first(process: MarkedProcess) -> tuple[bool, bool, int]:
    """Main processes, then the other leaders of process groups, then the rest; oldest first."""
    return (not process.leads, process.pid != process.group, process.start_time)


def _left_its_step(process: MarkedProcess, run: Leftover) -> bool:
    """`process` leads its own group but cannot be what localfleet spawned for `run` (which has
    its main process): it left the session of a step that was over."""
    if process.pid != process.group or (run.main is not None and run.main[0] == process.pid):
        return False
    return (
        process.main
        or process.step == "ExecStartPre"
        or (process.step == "ExecStartPost" and run.noted)
    )


def find_leftovers(runs: RegistryStore) -> dict[InstanceKey, list[Leftover]]:
    """`collect_leftovers` from the registry's notes and /proc; the notes of runs whose main
    process is gone are forgotten."""
    noted = []
    for key, run in runs.runs().items():
        if process_start_time(run.pid) == run.start_time:
            noted.append(run)
        else:
            runs.forget_run(*key)
    return collect_leftovers(noted, marked_processes(runs.identity()))


@dataclasses.dataclass(frozen=True)
class AgentContext:
    """What every instance needs from its host."""

    hostname: str
    base_environment: Mapping[str, str]
    log_dir: pathlib.Path | None
    runs: RegistryStore | None = None  # where the running processes are noted, for adoption


class UnitInstance:
    """One unit on one machine: fleet's view of it (its job state) and systemd's (its unit state)."""

    def __init__(
        self,
        key: InstanceKey,
        context: AgentContext,
        on_exit: Callable[[UnitInstance], None],
        leftovers: Sequence[Leftover] = (),
        on_reported: Callable[[UnitInstance], None] = lambda instance: None,
    ) -> None:
        self.key = key
        self._leftovers = list(leftovers)  # what a previous localfleet left running here
        self.unit_name, self.machine_id = key
        self._context = context
        self._on_exit = on_exit
        self._on_reported = on_reported  # told when the instance starts or stops having a state
        self._goal: DesiredInstance | None = None
        self._wake = asyncio.Event()
        self._loaded: _LoadedUnit | None = None
        self._job_launched = False
        self._state: UnitState | None = None
        self._activation: _Activation | None = None
        self._journal: UnitJournal | None = None
        self._log = log.bind(unit=self.unit_name, machine=self.machine_id)

    @property
    def goal(self) -> DesiredInstance | None:
        return self._goal

    def set_goal(self, goal: DesiredInstance | None) -> None:
        self._goal = goal
        self._wake.set()

    @property
    def state(self) -> UnitState | None:
        return self._state

    @property
    def job_state(self) -> str | None:
        """fleet's agent-side job state: None when not loaded."""
        if self._loaded is None:
            return None
        return JOB_LAUNCHED if self._job_launched else JOB_LOADED

    def journal_tail(self, lines: int) -> list[str]:
        return self._journal.tail(lines) if self._journal is not None else []

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                while await self._step_supervised():
                    pass
                if self._goal is None and self._loaded is None:
                    return  # no await between this check and on_exit: no goal can slip in
                await self._wake.wait()
        finally:
            self._on_exit(self)

    async def _step_supervised(self) -> bool:
        try:
            return await self._step()
        except Exception as exc:
            self._log.exception("unit_instance_error")
            self._abort(f"internal error: {exc!r}")
            return False

    async def _step(self) -> bool:
        """Take one step towards the goal; False when there is nothing to do."""
        goal = self._goal
        if self._loaded is not None and (goal is None or goal.unit_hash != self._loaded.hash):
            await self._stop()
            self._unload()
            return True
        if goal is None:
            return await self._clear_leftovers()
        if self._loaded is None:
            self._load(goal)
            return True
        if goal.launched and not self._job_launched:
            adopt = self._adoptable()
            await self._clear_leftovers(keep=adopt)
            if self._goal != goal:
                return True  # it changed while the leftovers stopped: read it again
            self._leftovers = []
            self._job_launched = True
            self._start(adopt)
            return True
        if not goal.launched and self._job_launched:
            self._job_launched = False
            await self._stop()
            return True
        return await self._clear_leftovers()  # not adopted by a start: not wanted

    def _load(self, goal: DesiredInstance) -> None:
        if self._journal is None:
            self._journal = UnitJournal(self.unit_name, self.machine_id, self._context.log_dir)
        try:
            spec: ServiceSpec | None = build_service_spec(
                goal.options, self.unit_name, self.machine_id, self._context.hostname
            )
            error = None
        except UnitLoadError as exc:
            spec, error = None, str(exc)
            self._journal.note(f"Failed to load unit: {error}")
            self._log.warning("unit_load_failed", reason=error)
        if spec is not None:
            for warning in spec.warnings:
                self._journal.note(warning)
                self._log.warning("unit_setting_ignored", detail=warning)
        self._loaded = _LoadedUnit(goal.unit_hash, spec, error)
        self._job_launched = False
        self._set_state("loaded" if spec is not None else "error", "inactive", "dead")

    def _unload(self) -> None:
        self._loaded = None
        self._job_launched = False
        self._activation = None
        self._state = None
        self._on_reported(self)
        self._log.info("unit_unloaded")

    def _adoptable(self) -> Leftover | None:
        """A leftover run of the loaded options whose main process still runs and that was not
        stopping, if they loaded."""
        loaded = self._loaded
        if loaded is None or loaded.spec is None:
            return None
        return next(
            (
                run
                for run in self._leftovers
                if run.main and not run.stopping and run.unit_hash == loaded.hash
            ),
            None,
        )

    async def _clear_leftovers(self, keep: Leftover | None = None) -> bool:
        """Stop what a previous localfleet left running here, but `keep`, and forget its note
        unless `keep` will be adopted; False when there was nothing to stop."""
        stray = [run for run in self._leftovers if run is not keep]
        self._leftovers = [keep] if keep is not None else []
        if not stray:
            return False
        groups = sorted(set().union(*(run.groups for run in stray)))
        pids = [run.main[0] for run in stray if run.main is not None]
        self._log.warning("unit_orphan_stopped", pids=pids, groups=groups)
        await stop_groups(groups)
        if keep is None and self._context.runs is not None:
            self._context.runs.forget_run(self.unit_name, self.machine_id)
        return True

    def _start(self, adopt: Leftover | None) -> None:
        assert self._loaded is not None and self._journal is not None
        if self._loaded.spec is None:
            # systemd refuses to start a unit that failed to load; localfleet reports it
            # failed so that a waiting client sees the end instead of waiting for ever.
            self._journal.note(f"Refusing to start: {self._loaded.load_error}")
            self._set_state(None, "failed", "failed")
            return
        stop_requested = asyncio.Event()
        runs = self._context.runs
        run = ServiceRun(
            spec=self._loaded.spec,
            base_environment=self._context.base_environment,
            journal=self._journal,
            on_state=lambda active, sub: self._set_run_state(run, active, sub),
            mark=ProcessMark(runs.identity(), self.machine_id, self.unit_name, self._loaded.hash)
            if runs is not None
            else None,
        )
        task = asyncio.create_task(
            self._supervise(run, stop_requested, adopt),
            name=f"unit:{self.unit_name}:{self.machine_id}",
        )
        self._activation = _Activation(run, stop_requested, task)

    async def _supervise(
        self, run: ServiceRun, stop_requested: asyncio.Event, adopt: Leftover | None
    ) -> None:
        try:
            if adopt is not None and adopt.main is not None:
                pid, start_time = adopt.main
                self._log.info("unit_adopted", pid=pid, groups=sorted(adopt.groups))
                result = await run.adopt(stop_requested, pid, start_time, sorted(adopt.groups))
            else:
                result = await run.execute(stop_requested)
            self._log.info("unit_run_finished", result=result.value)
        except Exception:
            self._log.exception("unit_run_error")
            run.kill_all()
            self._set_run_state(run, "failed", "failed")
        finally:
            if self._context.runs is not None:
                self._context.runs.forget_run(self.unit_name, self.machine_id)

    def _set_run_state(self, run: ServiceRun, active: str, sub: str) -> None:
        """A state from a run; ignored once that run no longer belongs to the loaded unit (after an abort)."""
        if self._activation is not None and self._activation.run is run:
            self._set_state(None, active, sub)
            self._note_run(run, active, sub)

    def _note_run(self, run: ServiceRun, active: str, sub: str) -> None:
        """Once running, note the process in the registry's database, for a restarted
        localfleet to adopt."""
        pid = run.main_pid
        if (active, sub) != ("active", "running") or self._context.runs is None or pid is None:
            return
        start_time = process_start_time(pid)
        if start_time is None or self._loaded is None:
            return
        self._context.runs.save_run(
            StoredRun(
                self.unit_name, self.machine_id, self._loaded.hash, pid, start_time, run.groups
            )
        )

    async def _stop(self) -> None:
        """Stop the running activation, if any, and wait until it has fully ended."""
        activation = self._activation
        if activation is None or activation.task.done():
            return
        activation.stop_requested.set()
        await activation.task

    def _abort(self, error: str) -> None:
        """After an unexpected error: kill the processes and report the unit failed until its goal changes."""
        activation = self._activation
        if activation is not None:
            activation.run.kill_all()
            activation.task.cancel()
            self._activation = None
        goal = self._goal
        if goal is None:
            self._unload()
            return
        if self._loaded is None or self._loaded.hash != goal.unit_hash:
            # Holding the goal's hash as "loaded, unusable" stops a retry loop; new options retry.
            self._loaded = _LoadedUnit(goal.unit_hash, None, error)
        self._job_launched = goal.launched
        self._set_state("error" if self._loaded.spec is None else None, "failed", "failed")

    def _set_state(self, load: str | None, active: str, sub: str) -> None:
        previous = self._state
        load_state = load or (previous.load_state if previous else "loaded")
        unit_hash = self._loaded.hash if self._loaded else ""
        self._state = UnitState(
            name=self.unit_name,
            hash=unit_hash,
            machine_id=self.machine_id,
            load_state=load_state,
            active_state=active,
            sub_state=sub,
        )
        if previous is None:
            self._on_reported(self)
        if previous is None or (previous.active_state, previous.sub_state) != (active, sub):
            self._log.info("unit_state", load=load_state, active=active, sub=sub)


def _keep_sorted(keys: list[InstanceKey], key: InstanceKey, present: bool) -> None:
    at = bisect.bisect_left(keys, key)
    there = at < len(keys) and keys[at] == key
    if present and not there:
        keys.insert(at, key)
    elif there and not present:
        del keys[at]


class Agent:
    """All instances of all units on all machines of this localfleet."""

    def __init__(self, context: AgentContext) -> None:
        self._context = context
        self._instances: dict[InstanceKey, UnitInstance] = {}
        self._machines_of: dict[str, set[str]] = {}  # unit name -> its instances' machines
        # The instances that report a state, sorted, all of them and by machine.
        self._states: list[InstanceKey] = []
        self._states_on: dict[str, list[InstanceKey]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # What a previous localfleet left running, handed to the instances by the first apply.
        self._leftovers = find_leftovers(context.runs) if context.runs is not None else {}

    def apply(self, changes: Mapping[InstanceKey, DesiredInstance | None]) -> None:
        """Give each instance in `changes` its new goal (None: no longer wanted), creating
        instances that are newly wanted; the others are not woken. The first apply also creates
        an instance for every instance a previous localfleet left processes for, wanted or not:
        each adopts or stops its own before it starts anything."""
        leftovers, self._leftovers = self._leftovers, {}
        for key, goal in changes.items():
            instance = self._instances.get(key)
            if instance is not None and instance.goal == goal:
                continue
            if instance is None:
                if goal is None and key not in leftovers:
                    continue
                instance = self._create(key, leftovers.pop(key, []))
            instance.set_goal(goal)
        for key, found in leftovers.items():
            self._create(key, found)

    def _create(self, key: InstanceKey, leftovers: list[Leftover]) -> UnitInstance:
        instance = UnitInstance(key, self._context, self._forget, leftovers, self._reported)
        self._instances[key] = instance
        self._machines_of.setdefault(key[0], set()).add(key[1])
        task = asyncio.create_task(instance.run(), name=f"instance:{key[0]}:{key[1]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return instance

    def _forget(self, instance: UnitInstance) -> None:
        if self._instances.get(instance.key) is instance:
            del self._instances[instance.key]
            machines = self._machines_of[instance.unit_name]
            machines.discard(instance.machine_id)
            if not machines:
                del self._machines_of[instance.unit_name]
            self._index(instance.key, reported=False)

    def _reported(self, instance: UnitInstance) -> None:
        if self._instances.get(instance.key) is instance:
            self._index(instance.key, reported=instance.state is not None)

    def _index(self, key: InstanceKey, reported: bool) -> None:
        """Keep the sorted lists of the instances that report a state, for pages of states."""
        machine_id = key[1]
        _keep_sorted(self._states, key, reported)
        _keep_sorted(self._states_on.setdefault(machine_id, []), key, reported)

    def states(self, machine_id: str = "", unit_name: str = "") -> Sequence[InstanceKey]:
        """The instances that report a UnitState, sorted by unit name then machine id, as fleet
        sorts them; only those on `machine_id` and of `unit_name` when they are given. The list
        is the agent's own, kept sorted as instances come and go: a page of it costs a page.
        Read it before the next change."""
        if unit_name:
            keys = self._states_on.get(machine_id, []) if machine_id else self._states
            at = bisect.bisect_left(keys, (unit_name, ""))
            found = []
            while at < len(keys) and keys[at][0] == unit_name:
                found.append(keys[at])
                at += 1
            return found
        if machine_id:
            return self._states_on.get(machine_id, [])
        return self._states

    def state(self, key: InstanceKey) -> UnitState:
        """The state of an instance `states` listed."""
        state = self._instances[key].state
        assert state is not None
        return state

    def job_state(self, unit_name: str, machine_id: str) -> str | None:
        instance = self._instances.get((unit_name, machine_id))
        return instance.job_state if instance is not None else None

    def journal_tail(self, unit_name: str, lines: int) -> list[str] | None:
        """The last lines of a unit's journal on every machine it is loaded on (a global
        unit's prefixed by the machine); None when it is loaded nowhere."""
        found = [
            (machine, self._instances[(unit_name, machine)])
            for machine in sorted(self._machines_of.get(unit_name, ()))
        ]
        if not found:
            return None
        if len(found) == 1:
            return found[0][1].journal_tail(lines)
        return [
            f"{machine[:8]} {line}"
            for machine, instance in found
            for line in instance.journal_tail(lines)
        ]

    async def shutdown(self) -> None:
        """Stop and unload every unit (ExecStop, SIGTERM, ExecStopPost...) and wait for all of them."""
        for instance in list(self._instances.values()):
            instance.set_goal(None)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
