"""What a restarted localfleet makes of the runs its predecessor noted and the marked processes
it finds: one leftover run per main process, with the groups that belong to it."""

from __future__ import annotations

from deployster.localfleet.agent import Leftover, collect_leftovers
from deployster.localfleet.service import MarkedProcess, ProcessMark
from deployster.localfleet.store import StoredRun

REGISTRY = "f" * 32
MACHINE = "0123456789abcdef0123456789abcdef"
OTHER_MACHINE = "fedcba9876543210fedcba9876543210"
OLD, NEW = "a" * 40, "b" * 40
KEY = ("web.service", MACHINE)


def marked(
    pid: int,
    group: int,
    step: str,
    *,
    unit_hash: str = NEW,
    start: int = 100,
    machine: str = MACHINE,
) -> MarkedProcess:
    mark = ProcessMark(REGISTRY, machine, "web.service", unit_hash)
    return MarkedProcess(pid=pid, group=group, start_time=start, mark=mark, step=step)


def test_a_noted_run_takes_its_marked_processes_but_the_daemons_of_its_start() -> None:
    """Noted once running: its ExecStartPost steps were over, so a process leading its own
    group with that step is a daemon that left it, as is a younger leader of the main step."""
    noted = StoredRun("web.service", MACHINE, NEW, 10, 100, (10, 5))
    found = collect_leftovers(
        [noted],
        [
            marked(10, 10, "ExecStart"),  # the noted main process itself
            marked(11, 10, "ExecStart"),  # its child
            marked(6, 5, "ExecStartPre"),  # a child left in an ExecStartPre's group
            marked(20, 20, "ExecStartPost", start=120),  # a daemon an ExecStartPost started
            marked(21, 20, "ExecStartPost", start=121),  # and its child
            marked(30, 30, "ExecStart", start=130),  # a daemon the main process started
        ],
    )
    assert found == {KEY: [Leftover(NEW, (10, 100), {5, 10}, noted=True)]}


def test_a_main_process_spawned_but_never_noted_is_a_run_with_its_start_post_step() -> None:
    found = collect_leftovers([], [marked(20, 20, "ExecStartPost"), marked(10, 10, "ExecStart")])
    assert found == {KEY: [Leftover(NEW, (10, 100), {10, 20})]}


def test_of_two_main_processes_not_noted_the_younger_left_the_older() -> None:
    found = collect_leftovers(
        [],
        [
            marked(30, 30, "ExecStart", start=300),
            marked(31, 30, "ExecStart", start=301),
            marked(10, 10, "ExecStart", start=100),
            marked(40, 40, "ExecStartPre", start=50),  # started before: a daemon all the same
        ],
    )
    assert found == {KEY: [Leftover(NEW, (10, 100), {10})]}


def test_without_a_main_process_a_start_pre_step_is_the_run() -> None:
    found = collect_leftovers([], [marked(40, 40, "ExecStartPre"), marked(41, 40, "ExecStartPre")])
    assert found == {KEY: [Leftover(NEW, None, {40})]}


def test_processes_without_a_main_process_of_theirs_are_runs_without_one() -> None:
    found = collect_leftovers(
        [],
        [
            marked(10, 10, "ExecStart"),
            # The child of a main process that has ended: not the running main's, to be stopped.
            marked(41, 40, "ExecStart", start=50),
            # A control process of other options (an ExecStopPost of the old definition).
            marked(50, 50, "ExecStopPost", unit_hash=OLD),
            marked(51, 50, "ExecStopPost", unit_hash=OLD),
        ],
    )
    assert found == {
        KEY: [
            Leftover(NEW, (10, 100), {10}),
            Leftover(OLD, None, {50}, stopping=True),
            Leftover(NEW, None, {40}),
        ]
    }


def test_instances_are_told_apart_by_unit_and_machine() -> None:
    noted = StoredRun("api.service", MACHINE, OLD, 5, 1, (5,))
    found = collect_leftovers(
        [noted], [marked(10, 10, "ExecStart"), marked(20, 20, "ExecStart", machine=OTHER_MACHINE)]
    )
    assert found == {
        ("api.service", MACHINE): [Leftover(OLD, (5, 1), {5}, noted=True)],
        KEY: [Leftover(NEW, (10, 100), {10})],
        ("web.service", OTHER_MACHINE): [Leftover(NEW, (20, 100), {20})],
    }


def test_a_run_with_a_stop_step_running_is_stopping() -> None:
    found = collect_leftovers(
        [],
        [
            marked(10, 10, "ExecStart"),
            marked(20, 20, "ExecStop"),
            marked(30, 30, "ExecStart", unit_hash=OLD),
        ],
    )
    assert found == {
        KEY: [
            Leftover(NEW, (10, 100), {10, 20}, stopping=True),
            Leftover(OLD, (30, 100), {30}),
        ]
    }


def test_a_mark_names_the_step_last_but_the_unit() -> None:
    mark = ProcessMark(REGISTRY, MACHINE, "a:b@c.service", NEW)
    assert mark.value("ExecStopPost") == f"{REGISTRY} {MACHINE} {NEW} ExecStopPost a:b@c.service"
