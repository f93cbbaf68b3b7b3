"""localfleet's systemd semantics for one service run, with real processes.

These drive `ServiceRun` directly, because timeouts, signal escalation and exit
status rules are easier to pin down here than through the HTTP API; the API
path is covered by test_localfleet.py. Unit lines follow systemd's rules: a
shell `$$` is written `$$$$`.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import time
import uuid

import pytest
from helpers import process_running

from deployster.fleet import UnitOption
from deployster.localfleet import service
from deployster.localfleet.journal import UnitJournal
from deployster.localfleet.service import (
    MARK_VARIABLE,
    ProcessMark,
    ServiceResult,
    ServiceRun,
    marked_processes,
)
from deployster.localfleet.unitfile import build_service_spec

UNIT = "svc@1.service"
MACHINE = "0123456789abcdef0123456789abcdef"
DEADLINE = 10.0


class Harness:
    """One ServiceRun with its states recorded and its journal in a temporary directory."""

    def __init__(
        self, tmp_path: pathlib.Path, *lines: tuple[str, str], mark: ProcessMark | None = None
    ) -> None:
        self.tmp_path = tmp_path
        self.states: list[tuple[str, str]] = []
        self.stop_requested = asyncio.Event()
        spec = build_service_spec(
            [UnitOption(section="Service", name=key, value=value) for key, value in lines],
            UNIT,
            MACHINE,
            "host",
        )
        self.journal = UnitJournal(UNIT, MACHINE, tmp_path / "logs")
        self.run = ServiceRun(
            spec=spec,
            base_environment=dict(os.environ),
            journal=self.journal,
            on_state=lambda active, sub: self.states.append((active, sub)),
            mark=mark,
        )
        self.task = asyncio.create_task(self.run.execute(self.stop_requested))

    async def wait_state(self, active: str, sub: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while (active, sub) not in self.states:
            assert not self.task.done(), (
                f"run ended in {self.states} before reaching {active}/{sub}"
            )
            assert time.monotonic() < deadline, f"no {active}/{sub} in {self.states}"
            await asyncio.sleep(0.02)

    async def wait_file(self, name: str) -> None:
        """Until the unit's shell has written `name`: what it did before (a trap) is done."""
        deadline = time.monotonic() + DEADLINE
        while not (self.tmp_path / name).exists():
            assert time.monotonic() < deadline, f"no {name} written"
            await asyncio.sleep(0.02)

    async def stop(self) -> ServiceResult:
        self.stop_requested.set()
        return await self.finish()

    async def finish(self) -> ServiceResult:
        return await asyncio.wait_for(self.task, DEADLINE)

    def journal_text(self) -> str:
        return (self.tmp_path / "logs" / f"{UNIT}.log").read_text()

    def pid(self, name: str) -> int:
        return int((self.tmp_path / name).read_text())


async def test_full_start_and_stop_sequence_with_mainpid(tmp_path: pathlib.Path) -> None:
    harness = Harness(
        tmp_path,
        ("ExecStartPre", "/bin/true"),
        ("ExecStart", f"/bin/sh -c 'echo $$$$ > {tmp_path}/main; exec sleep 300'"),
        ("ExecStartPost", f"/bin/sh -c 'echo $MAINPID > {tmp_path}/post'"),
        ("ExecStop", f"/bin/sh -c 'echo $MAINPID > {tmp_path}/stop'"),
        ("ExecStopPost", f"/bin/sh -c 'echo [$MAINPID] > {tmp_path}/stop-post'"),
    )
    await harness.wait_state("active", "running")
    assert await harness.stop() is ServiceResult.SUCCESS
    assert harness.states == [
        ("activating", "start-pre"),
        ("activating", "start-post"),
        ("active", "running"),
        ("deactivating", "stop"),
        ("deactivating", "stop-sigterm"),
        ("deactivating", "stop-post"),
        ("inactive", "dead"),
    ]
    main = harness.pid("main")
    assert harness.pid("post") == harness.pid("stop") == main
    assert (tmp_path / "stop-post").read_text() == "[]\n"
    assert not process_running(main)
    assert "Main process exited, code=killed, status=15/TERM" in harness.journal_text()


async def test_main_process_ending_by_itself_still_runs_exec_stop(tmp_path: pathlib.Path) -> None:
    harness = Harness(
        tmp_path,
        ("ExecStart", "/bin/sh -c 'echo bye'"),
        ("ExecStop", f"/bin/sh -c 'echo [$MAINPID] > {tmp_path}/stop'"),
        ("ExecStopPost", f"/bin/touch {tmp_path}/stop-post"),
    )
    assert await harness.finish() is ServiceResult.SUCCESS
    assert (tmp_path / "stop").read_text() == "[]\n"  # no MAINPID: the main process is gone
    assert (tmp_path / "stop-post").exists()
    assert harness.states[-1] == ("inactive", "dead")
    assert "sh[" in harness.journal_text() and ": bye" in harness.journal_text()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [([], ServiceResult.EXIT_CODE), ([("SuccessExitStatus", "143")], ServiceResult.SUCCESS)],
)
async def test_exit_code_143_on_sigterm_fails_unless_declared_successful(
    tmp_path: pathlib.Path, extra: list[tuple[str, str]], expected: ServiceResult
) -> None:
    harness = Harness(
        tmp_path,
        (
            "ExecStart",
            f"/bin/sh -c 'trap \"exit 143\" TERM; sleep 300 & touch {tmp_path}/ready; wait'",
        ),
        *extra,
    )
    await harness.wait_state("active", "running")
    await harness.wait_file("ready")
    assert await harness.stop() is expected
    assert harness.states[-1] == (
        ("inactive", "dead") if expected is ServiceResult.SUCCESS else ("failed", "failed")
    )


async def test_start_timeout_kills_the_start_and_runs_only_exec_stop_post(
    tmp_path: pathlib.Path,
) -> None:
    started = time.monotonic()
    harness = Harness(
        tmp_path,
        ("TimeoutStartSec", "300ms"),
        ("ExecStartPre", f"/bin/sh -c 'echo $$$$ > {tmp_path}/pre; exec sleep 300'"),
        ("ExecStart", f"/bin/touch {tmp_path}/started"),
        ("ExecStop", f"/bin/touch {tmp_path}/stop"),
        ("ExecStopPost", f"/bin/touch {tmp_path}/stop-post"),
    )
    assert await harness.finish() is ServiceResult.TIMEOUT
    assert time.monotonic() - started < 5
    assert harness.states[0] == ("activating", "start-pre")
    assert harness.states[-1] == ("failed", "failed")
    assert not (tmp_path / "started").exists() and not (tmp_path / "stop").exists()
    assert (tmp_path / "stop-post").exists()
    assert not process_running(harness.pid("pre"))
    assert "Start operation timed out" in harness.journal_text()


async def test_stop_timeout_escalates_to_sigkill_and_fails(tmp_path: pathlib.Path) -> None:
    harness = Harness(
        tmp_path,
        ("TimeoutStopSec", "300ms"),
        ("ExecStart", f"/bin/sh -c 'trap \"\" TERM; echo $$$$ > {tmp_path}/main; exec sleep 300'"),
    )
    await harness.wait_state("active", "running")
    await harness.wait_file("main")
    started = time.monotonic()
    assert await harness.stop() is ServiceResult.TIMEOUT
    assert time.monotonic() - started < 5
    assert ("deactivating", "stop-sigterm") in harness.states
    assert harness.states[-2:] == [("deactivating", "stop-sigkill"), ("failed", "failed")]
    assert not process_running(harness.pid("main"))


async def test_failing_exec_start_post_kills_the_main_process(tmp_path: pathlib.Path) -> None:
    harness = Harness(
        tmp_path,
        ("ExecStart", f"/bin/sh -c 'echo $$$$ > {tmp_path}/main; exec sleep 300'"),
        (
            "ExecStartPost",
            f"/bin/sh -c 'while [ ! -s {tmp_path}/main ]; do sleep 0.01; done; exit 4'",
        ),
    )
    assert await harness.finish() is ServiceResult.EXIT_CODE
    assert ("active", "running") not in harness.states
    assert not process_running(harness.pid("main"))
    assert "ExecStartPost process exited, code=exited, status=4" in harness.journal_text()


async def test_stop_while_starting_skips_exec_stop(tmp_path: pathlib.Path) -> None:
    harness = Harness(
        tmp_path,
        ("ExecStartPre", "/bin/sleep 300"),
        ("ExecStart", f"/bin/touch {tmp_path}/started"),
        ("ExecStop", f"/bin/touch {tmp_path}/stop"),
        ("ExecStopPost", f"/bin/touch {tmp_path}/stop-post"),
    )
    await harness.wait_state("activating", "start-pre")
    assert await harness.stop() is ServiceResult.SUCCESS
    assert harness.states[-1] == ("inactive", "dead")
    assert not (tmp_path / "started").exists() and not (tmp_path / "stop").exists()
    assert (tmp_path / "stop-post").exists()


async def test_stop_reaches_background_children_of_the_main_process(tmp_path: pathlib.Path) -> None:
    harness = Harness(
        tmp_path,
        ("ExecStart", f"/bin/sh -c 'sleep 300 & echo $! > {tmp_path}/child; exec sleep 301'"),
    )
    await harness.wait_state("active", "running")
    deadline = time.monotonic() + DEADLINE
    while not (tmp_path / "child").exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    child = harness.pid("child")
    assert process_running(child)
    assert await harness.stop() is ServiceResult.SUCCESS
    assert not process_running(child)


async def test_a_group_with_its_leader_alive_or_no_process_left_needs_no_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scan of /proc reads every process of the host (about a second with ten thousand units,
    the event loop standing still): a group whose leader lives, or that has no process left,
    is told apart without one."""
    scans = []
    monkeypatch.setattr(service, "_scan_live_process_groups", lambda: scans.append(1) or set())
    leader = await asyncio.create_subprocess_exec("/bin/sleep", "300", start_new_session=True)
    try:
        assert list(service._SCANNER.live_groups({leader.pid: time.monotonic()})) == [leader.pid]
    finally:
        leader.kill()
        await leader.wait()  # reaped: no process is left in the group
    assert service._SCANNER.live_groups({leader.pid: time.monotonic()}) == {}
    assert scans == []


async def test_a_group_whose_leader_died_lives_while_a_member_does() -> None:
    """The leader gone, the glance cannot tell: the scan finds the member left behind, and
    once that one is killed the group is gone (a zombie no one reaps counts as gone)."""
    leader = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        "sleep 300 >/dev/null 2>&1 & echo $!",
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    stdout, _ = await leader.communicate()  # the leader has exited and been reaped
    member = int(stdout)
    group = leader.pid
    try:
        assert service._group_alive_at_a_glance(group) is None
        assert list(service._SCANNER.live_groups({group: time.monotonic()})) == [group]
    finally:
        os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE
    while service._SCANNER.live_groups({group: time.monotonic()}):
        assert time.monotonic() < deadline, "a killed member still counts as alive"
        await asyncio.sleep(0.02)


async def test_a_group_left_with_its_unreaped_zombie_leader_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A zombie no one reaps (its parent busy, or PID 1 in a container that does not reap)
    keeps its group in existence: the scan tells it holds nothing alive."""
    scans = []
    scan = service._scan_live_process_groups
    monkeypatch.setattr(service, "_scan_live_process_groups", lambda: scans.append(1) or scan())
    leader = subprocess.Popen(["/bin/sleep", "300"], start_new_session=True)
    try:
        leader.kill()
        deadline = time.monotonic() + DEADLINE
        while service.process_start_time(leader.pid) is not None:  # not yet a zombie
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        os.killpg(leader.pid, 0)  # the zombie keeps the group
        assert service._SCANNER.live_groups({leader.pid: time.monotonic()}) == {}
        assert scans == [1]
    finally:
        leader.wait()


async def test_a_group_with_no_process_left_is_gone() -> None:
    gone = await asyncio.create_subprocess_exec("/bin/true", start_new_session=True)
    await gone.wait()
    assert service._group_alive_at_a_glance(gone.pid) is False
    assert service._SCANNER.live_groups({gone.pid: time.monotonic()}) == {}
    with pytest.raises(ProcessLookupError):
        os.killpg(gone.pid, 0)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("-/bin/false", ServiceResult.SUCCESS),
        ("/bin/false", ServiceResult.EXIT_CODE),
        ("/no/such/binary", ServiceResult.EXIT_CODE),
        ("no-such-binary-in-path", ServiceResult.EXIT_CODE),
        ("-/no/such/binary", ServiceResult.SUCCESS),
        ("/bin/sh -c 'kill -USR1 $$$$'", ServiceResult.SIGNAL),
        ("/bin/sh -c 'kill -TERM $$$$'", ServiceResult.SUCCESS),
        ("true", ServiceResult.SUCCESS),  # a bare name is looked up in PATH
    ],
)
async def test_main_process_results(
    tmp_path: pathlib.Path, line: str, expected: ServiceResult
) -> None:
    assert await Harness(tmp_path, ("ExecStart", line)).finish() is expected


async def test_argv0_prefix_and_variable_expansion_switch(tmp_path: pathlib.Path) -> None:
    harness = Harness(
        tmp_path,
        ("Environment", "X=unit-value"),
        ("ExecStartPre", f"@/bin/sh my-shell -c 'echo $0 > {tmp_path}/argv0'"),
        ("ExecStartPre", "/bin/echo expanded=${X}"),
        ("ExecStartPre", ":/bin/echo verbatim=${X}"),
        ("ExecStart", "/bin/true"),
    )
    assert await harness.finish() is ServiceResult.SUCCESS
    assert (tmp_path / "argv0").read_text() == "my-shell\n"
    journal = harness.journal_text()
    assert ": expanded=unit-value" in journal
    assert ": verbatim=${X}" in journal


async def test_every_process_of_a_run_carries_its_mark_and_is_found_by_it(
    tmp_path: pathlib.Path,
) -> None:
    """The main process, its child and a control process, each with its role and group; a unit
    that sets the variable itself does not change its mark; garbage marks find nothing."""
    mark = ProcessMark(uuid.uuid4().hex, MACHINE, UNIT, "ab" * 20)
    harness = Harness(
        tmp_path,
        ("Environment", f"{MARK_VARIABLE}=forged"),
        ("ExecStart", "/bin/sh -c 'sleep 300 & wait'"),
        ("ExecStartPost", "/bin/sleep 301"),
        mark=mark,
    )
    garbage = [
        subprocess.Popen(["/bin/sleep", "302"], env={MARK_VARIABLE: value}, start_new_session=True)
        for value in (
            f"{mark.registry} {MACHINE} {'ab' * 20}",  # cut short
            f"{mark.registry} {MACHINE} {'ab' * 20} ExecBoss {UNIT}",  # no such step
            f"{uuid.uuid4().hex} {MACHINE} {'ab' * 20} ExecStart {UNIT}",  # another registry
        )
    ]
    try:
        await harness.wait_state("activating", "start-post")
        main = harness.run.main_pid
        assert main is not None

        async def three() -> list[tuple[bool, str, int, ProcessMark]]:
            found = sorted(marked_processes(mark.registry), key=lambda p: (not p.leads, p.step))
            return [(p.leads, p.step, p.group, p.mark) for p in found]

        deadline = time.monotonic() + DEADLINE
        while len(found := await three()) < 3:  # the main process's child is on its way
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.02)
        (post,) = [pid for pid in harness.run.groups if pid != main]
        assert found == [
            (True, "ExecStart", main, mark),  # the main process
            (False, "ExecStart", main, mark),  # its child, in its group
            (False, "ExecStartPost", post, mark),  # in its own
        ]
    finally:
        for process in garbage:
            process.kill()
            process.wait()
        await harness.stop()
    assert marked_processes(mark.registry) == []
