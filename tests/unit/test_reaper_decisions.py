"""The reaper's decisions: which announcements are stale, which deploy records go."""

import asyncio
import time
from collections.abc import AsyncIterator

from deployster.fleet import Machine
from deployster.naming import UnitName
from deployster.records import DeployRecord, DeployState
from deployster.units import Announcement
from handlers.reaper import Announced, FleetView, prunable, stale_reason

M1, M2 = "a" * 32, "b" * 32
NAME = UnitName("web", "v1", "2026.01.01-00.00.00", 1)


def announced(machine: str = M1) -> Announced:
    a = Announcement(url="http://10.0.0.1:3000", machine=machine, unit=str(NAME))
    return Announced(
        key=f"/deployster/instances/web/{NAME.release}/1",
        raw=a.model_dump_json(),
        unit=NAME,
        machine=a.machine,
    )


def fleet(
    machine_id: str = M1,
    active: str = "active",
    units: bool = True,
    machines: tuple[str, ...] = (M1, M2),
) -> FleetView:
    unit = (str(NAME), "launched", "launched", machine_id)
    state = (str(NAME), machine_id, "loaded", active, "running")

    async def rows(*items: tuple[str, ...]) -> AsyncIterator[list[tuple[str, ...]]]:
        yield list(items)

    view = FleetView()
    asyncio.run(
        view.load(
            rows(*([unit] if units else [])),
            rows(state),
            [Machine(id=m) for m in machines],
            time.time(),
        )
    )
    return view


def test_a_running_instance_is_not_stale() -> None:
    assert stale_reason(announced(), fleet()) is None
    assert stale_reason(announced(machine=M1[:8]), fleet()) is None  # short id


def test_a_unit_gone_from_fleet() -> None:
    assert stale_reason(announced(), fleet(units=False)) == f"unit {NAME} is gone from fleet"


def test_a_machine_that_left_the_cluster() -> None:
    assert stale_reason(announced(), fleet(machines=(M2,))) == f"machine {M1} left the cluster"


def test_a_unit_fleet_moved_elsewhere() -> None:
    assert stale_reason(announced(machine=M1), fleet(machine_id=M2)) == (
        f"fleet moved unit {NAME} to machine {M2}"
    )


def test_a_failed_or_stopped_unit() -> None:
    for active in ("failed", "inactive"):
        assert (
            stale_reason(announced(), fleet(active=active))
            == f"unit {NAME} is {active} on machine {M1}"
        )
    assert stale_reason(announced(), fleet(active="activating")) is None


def record(n: int, version: str, state: DeployState) -> DeployRecord:
    return DeployRecord(
        id=f"d{n}",
        service="web",
        version=version,
        timestamp=f"2026.01.{n:02}-00.00.00",
        instance_count=1,
        destroy_previous=True,
        state=state,
    )


def test_history_keeps_the_newest_finished_deploys() -> None:
    records = [record(n, f"v{n}", DeployState.SUCCEEDED) for n in range(1, 6)]
    assert [r.id for r in prunable(records, keep=3)] == ["d1", "d2"]
    assert prunable(records, keep=10) == []


def test_history_spares_the_live_release_its_rollback_target_and_unfinished_deploys() -> None:
    records = [
        record(1, "v1", DeployState.SUCCEEDED),
        record(2, "v2", DeployState.SUCCEEDED),
        record(3, "v3", DeployState.FAILED),
        record(4, "v4", DeployState.ROLLED_BACK),
        record(5, "v5", DeployState.RUNNING),
    ]
    # keep=1 keeps d4 (newest finished); d2 is live, d1 the rollback target; d5 runs.
    assert [r.id for r in prunable(records, keep=1)] == ["d3"]
