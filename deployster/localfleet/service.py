"""One start of a `Type=simple` service, through systemd's sequence of states.

`ServiceRun.execute` is what `systemctl start` and, later, `systemctl stop`
(or the main process ending) do to one service, and it reports each state as
systemd's `ActiveState`/`SubState` pair:

    activating/start-pre    ExecStartPre lines, in order
    (main process spawned)  ExecStart
    activating/start-post   ExecStartPost lines ($MAINPID set)
    active/running          until the main process exits or a stop is requested
    deactivating/stop       ExecStop lines ($MAINPID set while the main process lives)
    deactivating/stop-sigterm, stop-sigkill
                            SIGTERM to every process group the run started, then
                            SIGKILL after TimeoutStopSec
    deactivating/stop-post  ExecStopPost lines, always, also after a failure
    deactivating/final-sigterm, final-sigkill
                            whatever the ExecStopPost lines left behind
    inactive/dead           the run succeeded
    failed/failed           it did not: a step failed, a timeout hit, or the main
                            process ended uncleanly

systemd's rules kept here: a non-`-` start step that fails, or TimeoutStartSec
running out, fails the unit without running ExecStop (only ExecStopPost);
ExecStop runs after a successful start even when the main process ended on its
own; a main process exit is clean when it is 0 (or listed in
`SuccessExitStatus=`) or death by SIGHUP, SIGINT, SIGTERM or SIGPIPE, so a
main process that answers SIGTERM with exit code 143 leaves the unit failed,
as on systemd; a SIGKILL after a timeout fails the unit (result `timeout`).

Every process is started in its own session (so its own process group), with
cwd `/`, stdin from /dev/null and stdout+stderr into the unit's journal;
signalling a group reaches the whole tree a command started, the stand-in for
systemd's cgroup. A process that starts its own session escapes, as it would
escape a process group anywhere. Groups are considered gone when no
non-zombie process is left in them (from /proc, where there is one): zombies
whose parent died may never be reaped where PID 1 does not reap them, as in
many containers.

With a `ProcessMark`, every process a run starts carries in its environment
(`LOCALFLEET_UNIT`, after the unit's own variables, so a unit cannot change
it) which registry, machine, unit and unit hash it belongs to, and the step
that started it (`ExecStart` for the main process); its children inherit it.
`marked_processes` finds them again in /proc: a restarted localfleet learns
from them what its predecessor started, also in the moment between a spawn
and the note of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import glob
import math
import os
import pathlib
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from .environ import expand_exec_argv, parse_environment_file
from .journal import UnitJournal
from .unitfile import ExecCommand, ServiceSpec

_POLL_INTERVAL = 0.05
_ADOPTED_POLL_INTERVAL = 0.5
_SCAN_MAX_AGE = 0.05
# A main process that has just died is a zombie until asyncio's child watcher (a thread
# blocked in waitpid) reaps it, moments later: one short wait spares a /proc scan.
_REAP_GRACE = 0.001
# After SIGKILL nothing can delay an exit for long; bound the wait anyway.
_KILL_GRACE = 5.0
_JOURNAL_DRAIN = 1.0
_CLEAN_EXIT_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})
MARK_VARIABLE = "LOCALFLEET_UNIT"
_STEPS = frozenset({"ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecStopPost"})

StateListener = Callable[[str, str], None]


class ServiceResult(enum.Enum):
    """systemd's `Result=` of a service run."""

    SUCCESS = "success"
    EXIT_CODE = "exit-code"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    RESOURCES = "resources"


class SpawnError(RuntimeError):
    """A command could not be executed at all (systemd's status 203/EXEC)."""


class EnvironmentFileError(RuntimeError):
    """A non-optional EnvironmentFile= cannot be read."""


def build_environment(spec: ServiceSpec, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the unit's processes: `base`, then Environment=, then EnvironmentFile= (which wins)."""
    environment = dict(base)
    environment.update(spec.environment)
    for ref in spec.environment_files:
        has_glob = any(char in ref.path for char in "*?[")
        paths = (
            [pathlib.Path(match) for match in sorted(glob.glob(ref.path))]
            if has_glob
            else [pathlib.Path(ref.path)]
        )
        if not paths and not ref.optional:
            raise EnvironmentFileError(f"{ref.path}: no file matches")
        for path in paths:
            try:
                text = path.read_text(errors="replace")
            except OSError as exc:
                if ref.optional:
                    continue
                raise EnvironmentFileError(f"{path}: {exc.strerror}") from exc
            environment.update(parse_environment_file(text))
    return environment


def describe_exit(returncode: int) -> str:
    """systemd's wording: `code=exited, status=1` or `code=killed, status=15/TERM`."""
    if returncode >= 0:
        return f"code=exited, status={returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        name = "?"
    return f"code=killed, status={number}/{name}"


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of `/proc/<pid>/stat` after the command name (state first), or None when
    there is no such process. The command name may hold spaces and parentheses; the fields
    after the last ')' do not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """When a live (non-zombie) process started, in clock ticks since boot (`/proc/<pid>/stat`
    field 22); None when there is no such process. With the pid it names one process for good:
    a pid the kernel reuses comes with another start time."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


@dataclasses.dataclass(frozen=True)
class ProcessMark:
    """Whose a process is: the registry (one per state directory), machine, unit and unit hash."""

    registry: str
    machine_id: str
    unit: str
    unit_hash: str

    def value(self, step: str) -> str:
        """`LOCALFLEET_UNIT`'s value for a process of `step` (`ExecStart`, `ExecStop`...); the
        unit name last, as the only part that is not a hex id or a step."""
        return f"{self.registry} {self.machine_id} {self.unit_hash} {step} {self.unit}"


@dataclasses.dataclass(frozen=True)
class MarkedProcess:
    """A live process carrying a mark: its process group, start time and the step of the run
    that started it (or its ancestor)."""

    pid: int
    group: int
    start_time: int
    mark: ProcessMark
    step: str

    @property
    def main(self) -> bool:
        """The main process or one of its descendants."""
        return self.step == "ExecStart"

    @property
    def stopping(self) -> bool:
        """Started by a stop: its run was on its way out."""
        return self.step in ("ExecStop", "ExecStopPost")

    @property
    def leads(self) -> bool:
        """A main process itself: it leads the process group of its session."""
        return self.main and self.pid == self.group


def marked_processes(registry: str) -> list[MarkedProcess]:
    """The live processes whose environment carries a mark of `registry`, from /proc; none
    where there is no /proc. A process whose environment cannot be read (another user's) or
    whose mark is not whole is not one of them."""
    prefix = f"{MARK_VARIABLE}={registry} ".encode()
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if not (entry.isascii() and entry.isdigit()):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = file.read()
        except OSError:
            continue
        if prefix not in environ:
            continue
        variable = next((v for v in environ.split(b"\0") if v.startswith(prefix)), None)
        parts = variable[len(prefix) :].decode(errors="replace").split(" ", 3) if variable else []
        fields = _stat_fields(entry)
        if (
            len(parts) != 4
            or parts[2] not in _STEPS
            or fields is None
            or len(fields) < 20
            or fields[0] in (b"Z", b"X")
        ):
            continue
        machine_id, unit_hash, step, unit = parts
        found.append(
            MarkedProcess(
                pid=int(entry),
                group=int(fields[2]),
                start_time=int(fields[19]),
                mark=ProcessMark(registry, machine_id, unit, unit_hash),
                step=step,
            )
        )
    return found


def _scan_live_process_groups() -> set[int] | None:
    """Process groups with at least one non-zombie member, from /proc; None where there is no /proc."""
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:
        return None
    groups: set[int] = set()
    for entry in entries:
        if not (entry.isascii() and entry.isdigit()):
            continue
        fields = _stat_fields(entry)
        if fields is not None and len(fields) > 2 and fields[0] not in (b"Z", b"X"):
            groups.add(int(fields[2]))
    return groups


def _group_alive_at_a_glance(group: int) -> bool | None:
    """Whether a group still has a live process, where two cheap looks tell: a group with no
    process at all (not even a zombie) is gone; a group whose leader lives is alive. None when
    only a scan of /proc can tell (the leader is gone or a zombie, and the group still holds
    processes, perhaps only zombies).

    Each group here is a session its leader started, and a session leader cannot leave its
    group; the kernel gives no new process a pid still in use as a group id. So while the
    group exists, the process with its pid is its leader."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists
    return True if process_start_time(group) is not None else None


class _ProcessGroupScan:
    """Which groups still have a live process, at the cost of a /proc scan only where a glance
    does not tell (`_group_alive_at_a_glance`): the scan reads every process of the host, which
    takes about a second with ten thousand of them, during which the event loop stands still.
    A scan is shared by every run for a moment, so that many units stopping at once stay
    cheap; it is reused only for groups it can have seen: a group started after the scan
    began forces a new one.
    """

    def __init__(self) -> None:
        self._started_at = -math.inf
        self._live: set[int] | None = None

    def live_groups(self, groups: Mapping[int, float]) -> dict[int, float]:
        """The entries of `groups` (group -> time it was started) that still have a live process."""
        glance = {group: _group_alive_at_a_glance(group) for group in groups}
        unseen = [group for group, seen in glance.items() if seen is None]
        if unseen:
            time.sleep(_REAP_GRACE)
            glance.update({group: _group_alive_at_a_glance(group) for group in unseen})
        unsure = [started for group, started in groups.items() if glance[group] is None]
        now = time.monotonic()
        too_old = now - self._started_at > _SCAN_MAX_AGE
        if unsure and (too_old or any(started >= self._started_at for started in unsure)):
            self._started_at = now
            self._live = _scan_live_process_groups()
        return {
            group: started
            for group, started in groups.items()
            if glance[group] or (glance[group] is None and _group_alive(group, self._live))
        }


_SCANNER = _ProcessGroupScan()


def _group_alive(group: int, live: set[int] | None) -> bool:
    if live is not None:
        return group in live
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_groups(groups: Sequence[int], signum: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


async def stop_groups(groups: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM process groups no run owns any more, and SIGKILL what is left after ``timeout``.
    The /proc scans are the shared ones: many leftovers stopping at once after a restart cost
    one scan per poll, not one per group."""
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    live = _SCANNER.live_groups(dict.fromkeys(groups, -math.inf))
    while live:
        if time.monotonic() > deadline:
            _signal_groups(list(live), signal.SIGKILL)
            return
        await asyncio.sleep(_POLL_INTERVAL)
        live = _SCANNER.live_groups(live)


def _resolve_executable(path: str, search_path: str | None) -> str:
    if "/" in path:
        return path
    # Newer systemd looks a bare name up in a fixed search path; here, the unit's PATH.
    found = shutil.which(path, path=search_path)
    if found is None:
        raise SpawnError(f"Failed to locate executable {path}: not found in PATH")
    return found


class ServiceRun:
    """One activation of a unit, from `start` to `dead` or `failed`."""

    def __init__(
        self,
        *,
        spec: ServiceSpec,
        base_environment: Mapping[str, str],
        journal: UnitJournal,
        on_state: StateListener,
        mark: ProcessMark | None = None,
    ) -> None:
        self._spec = spec
        self._mark = mark
        self._base_environment = base_environment
        self._journal = journal
        self._on_state = on_state
        self._result = ServiceResult.SUCCESS
        self._groups: dict[int, float] = {}  # process group -> when it was started (monotonic)
        self._readers: list[asyncio.Task[None]] = []
        self._main_pid: int | None = None
        self._main_exit: asyncio.Task[None] | None = None

    @property
    def main_pid(self) -> int | None:
        return self._main_pid

    @property
    def groups(self) -> tuple[int, ...]:
        """The process groups this run started (the main process's among them)."""
        return tuple(self._groups)

    async def execute(self, stop_requested: asyncio.Event) -> ServiceResult:
        """Start, run until the main process ends or `stop_requested` is set, stop, and return the result."""
        self._journal.note("Starting.")
        try:
            environment = build_environment(self._spec, self._base_environment)
        except EnvironmentFileError as exc:
            self._journal.note(f"Failed to load environment files: {exc}")
            self._fail(ServiceResult.RESOURCES)
            return self._finish()
        if await self._start(environment, stop_requested):
            main_alive = await self._run_until_stop(stop_requested)
            await self._run_stop_commands(environment, main_alive)
        return await self._stop_and_finish(environment)

    async def adopt(
        self, stop_requested: asyncio.Event, pid: int, start_time: int, groups: Sequence[int]
    ) -> ServiceResult:
        """Take over a main process that a previous localfleet started and that still runs,
        as systemd keeps its units across a restart of its own: report it running, watch it,
        and stop it as if this run had started it. Its exit code cannot be known (localfleet
        is not its parent), and its output went to the previous localfleet's pipe."""
        self._journal.note(f"Adopted main process {pid} after a localfleet restart.")
        try:
            environment = build_environment(self._spec, self._base_environment)
        except EnvironmentFileError:
            environment = dict(self._base_environment)
        self._main_pid = pid
        self._groups = dict.fromkeys(groups, -math.inf)
        self._main_exit = asyncio.create_task(self._watch_adopted(pid, start_time, stop_requested))
        self._on_state("active", "running")
        main_alive = await self._run_until_stop(stop_requested)
        await self._run_stop_commands(environment, main_alive)
        return await self._stop_and_finish(environment)

    async def _watch_adopted(
        self, pid: int, start_time: int, stop_requested: asyncio.Event
    ) -> None:
        while True:
            if process_start_time(pid) != start_time:
                break
            await asyncio.sleep(_ADOPTED_POLL_INTERVAL)
        self._journal.note("Main process exited (status unknown: it was adopted).")
        if not stop_requested.is_set():
            self._fail(ServiceResult.EXIT_CODE)

    async def _stop_and_finish(self, environment: dict[str, str]) -> ServiceResult:
        await self._terminate("stop-sigterm", "stop-sigkill")
        await self._run_stop_post(environment)
        await self._terminate("final-sigterm", "final-sigkill")
        await self._drain_journal()
        return self._finish()

    def kill_all(self) -> None:
        """SIGKILL everything this run started; for when the run itself broke."""
        _signal_groups(self._live_groups(), signal.SIGKILL)
        for task in (*self._readers, self._main_exit):
            if task is not None:
                task.cancel()

    # Start

    async def _start(self, environment: dict[str, str], stop_requested: asyncio.Event) -> bool:
        """Run the start steps within TimeoutStartSec; False when the unit did not reach `running`."""
        steps = asyncio.create_task(self._start_steps(environment))
        stop_wait = asyncio.create_task(stop_requested.wait())
        try:
            done, _ = await asyncio.wait(
                {steps, stop_wait},
                timeout=self._spec.timeout_start,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_wait.cancel()
        if steps in done:
            return steps.result()
        steps.cancel()
        # asyncio.wait, not `await steps`: a cancellation of this run itself must not be swallowed.
        await asyncio.wait({steps})
        if not steps.cancelled():
            steps.result()  # re-raises an error the steps hit just before they were cancelled
        if stop_requested.is_set():
            self._journal.note("Stop requested while starting.")
        else:
            self._journal.note("Start operation timed out. Terminating.")
            self._fail(ServiceResult.TIMEOUT)
        return False

    async def _start_steps(self, environment: dict[str, str]) -> bool:
        if self._spec.exec_start_pre:
            self._on_state("activating", "start-pre")
            if not await self._run_commands(self._spec.exec_start_pre, environment, "ExecStartPre"):
                return False
        try:
            main = await self._spawn(self._spec.exec_start, environment, "ExecStart")
        except SpawnError as exc:
            # Never started; with a `-` prefix the run still counts as a success (inactive/dead).
            self._journal.note(str(exc))
            self._command_failed(self._spec.exec_start, ServiceResult.EXIT_CODE)
            return False
        self._main_pid = main.pid
        self._main_exit = asyncio.create_task(self._watch_main(main))
        if self._spec.exec_start_post:
            self._on_state("activating", "start-post")
            post_environment = {**environment, "MAINPID": str(main.pid)}
            if not await self._run_commands(
                self._spec.exec_start_post, post_environment, "ExecStartPost"
            ):
                return False
        if not self._main_exit.done():
            self._on_state("active", "running")
        return True

    async def _watch_main(self, main: asyncio.subprocess.Process) -> None:
        returncode = await main.wait()
        self._journal.note(f"Main process exited, {describe_exit(returncode)}")
        self._fail(self._main_exit_result(returncode))

    def _main_exit_result(self, returncode: int) -> ServiceResult:
        if self._spec.exec_start.ignore_failure:
            return ServiceResult.SUCCESS
        if returncode >= 0:
            clean = returncode == 0 or returncode in self._spec.success_exit_codes
            return ServiceResult.SUCCESS if clean else ServiceResult.EXIT_CODE
        signum = -returncode
        clean = signum in _CLEAN_EXIT_SIGNALS or signum in self._spec.success_signals
        return ServiceResult.SUCCESS if clean else ServiceResult.SIGNAL

    # Running

    async def _run_until_stop(self, stop_requested: asyncio.Event) -> bool:
        """Wait for the main process to exit or a stop; True when the main process still runs."""
        assert self._main_exit is not None
        stop_wait = asyncio.create_task(stop_requested.wait())
        try:
            await asyncio.wait({self._main_exit, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        return not self._main_exit.done()

    # Stop

    async def _run_stop_commands(self, environment: dict[str, str], main_alive: bool) -> None:
        if not self._spec.exec_stop:
            return
        self._on_state("deactivating", "stop")
        if main_alive and self._main_pid is not None:
            environment = {**environment, "MAINPID": str(self._main_pid)}
        await self._within_stop_timeout(
            "stop", self._run_commands(self._spec.exec_stop, environment, "ExecStop")
        )

    async def _run_stop_post(self, environment: dict[str, str]) -> None:
        if not self._spec.exec_stop_post:
            return
        self._on_state("deactivating", "stop-post")
        await self._within_stop_timeout(
            "stop-post", self._run_commands(self._spec.exec_stop_post, environment, "ExecStopPost")
        )

    async def _within_stop_timeout(self, state: str, steps: Awaitable[bool]) -> None:
        try:
            await asyncio.wait_for(steps, self._spec.timeout_stop)
        except TimeoutError:
            self._journal.note(f"State '{state}' timed out.")
            self._fail(ServiceResult.TIMEOUT)

    async def _terminate(self, term_state: str, kill_state: str) -> None:
        """SIGTERM every live process group, SIGKILL after TimeoutStopSec; then collect the main exit."""
        groups = self._live_groups()
        if groups:
            self._on_state("deactivating", term_state)
            _signal_groups(groups, signal.SIGTERM)
            if not await self._wait_groups_gone(self._spec.timeout_stop):
                self._journal.note(f"State '{term_state}' timed out. Killing.")
                self._fail(ServiceResult.TIMEOUT)
                self._on_state("deactivating", kill_state)
                _signal_groups(self._live_groups(), signal.SIGKILL)
                await self._wait_groups_gone(_KILL_GRACE)
        if self._main_exit is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._main_exit), _KILL_GRACE)

    def _live_groups(self) -> list[int]:
        """The groups this run started that still have a live process; forgets the others for good."""
        # An empty group can never fill again (each is its own session), and
        # forgetting it keeps a reused pid from being signalled later.
        self._groups = _SCANNER.live_groups(self._groups)
        return list(self._groups)

    async def _wait_groups_gone(self, timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._live_groups():
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_INTERVAL)
        return True

    # Commands

    async def _run_commands(
        self, commands: Sequence[ExecCommand], environment: dict[str, str], label: str
    ) -> bool:
        """Run control commands in order; False at the first failure that is not ignored."""
        for command in commands:
            if not await self._run_control(command, environment, label):
                return False
        return True

    async def _run_control(
        self, command: ExecCommand, environment: dict[str, str], label: str
    ) -> bool:
        try:
            process = await self._spawn(command, environment, label)
        except SpawnError as exc:
            self._journal.note(f"{label}: {exc}")
            return self._command_failed(command, ServiceResult.EXIT_CODE)
        returncode = await process.wait()
        if returncode == 0:
            return True
        self._journal.note(f"{label} process exited, {describe_exit(returncode)}")
        return self._command_failed(
            command, ServiceResult.EXIT_CODE if returncode > 0 else ServiceResult.SIGNAL
        )

    def _command_failed(self, command: ExecCommand, result: ServiceResult) -> bool:
        """Record a failed command; True when its `-` prefix says to carry on."""
        if command.ignore_failure:
            return True
        self._fail(result)
        return False

    async def _spawn(
        self, command: ExecCommand, environment: dict[str, str], step: str
    ) -> asyncio.subprocess.Process:
        if self._mark is not None:
            environment = {**environment, MARK_VARIABLE: self._mark.value(step)}
        argv = (
            expand_exec_argv(command.argv, environment)
            if command.expand_variables
            else list(command.argv)
        )
        executable = _resolve_executable(command.path, environment.get("PATH"))
        try:
            process = await asyncio.create_subprocess_exec(
                *(argv or [command.path]),
                executable=executable,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=environment,
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            raise SpawnError(f"Failed to execute {command.path}: {exc.strerror or exc}") from exc
        self._groups[process.pid] = time.monotonic()
        assert process.stdout is not None
        self._readers.append(
            self._journal.follow(os.path.basename(command.path), process.pid, process.stdout)
        )
        return process

    # End

    def _fail(self, result: ServiceResult) -> None:
        """Keep the first failure, as systemd keeps the first non-success result."""
        if self._result is ServiceResult.SUCCESS:
            self._result = result

    async def _drain_journal(self) -> None:
        """Let the last output reach the journal; a pipe held open by an escaped process is abandoned."""
        pending = [reader for reader in self._readers if not reader.done()]
        if pending:
            await asyncio.wait(pending, timeout=_JOURNAL_DRAIN)
        for reader in self._readers:
            reader.cancel()

    def _finish(self) -> ServiceResult:
        if self._result is ServiceResult.SUCCESS:
            self._on_state("inactive", "dead")
            self._journal.note("Deactivated successfully.")
        else:
            self._on_state("failed", "failed")
            self._journal.note(f"Failed with result '{self._result.value}'.")
        return self._result
