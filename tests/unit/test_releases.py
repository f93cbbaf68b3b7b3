"""Release rules: the live release and the rollback target."""

from deployster.records import DeployRecord, DeployState
from deployster.releases import live_release, rollback_target


def record(n: int, version: str, state: DeployState) -> DeployRecord:
    return DeployRecord(
        id=f"d{n}",
        service="web",
        version=version,
        timestamp=f"2026.01.0{n}-00.00.00",
        instance_count=1,
        destroy_previous=True,
        state=state,
    )


def test_the_last_success_before_the_live_one_with_another_version() -> None:
    records = [
        record(1, "v1", DeployState.SUCCEEDED),
        record(2, "v2", DeployState.SUCCEEDED),
        record(3, "v3", DeployState.ROLLED_BACK),
        record(4, "v2", DeployState.SUCCEEDED),
    ]
    target = rollback_target(records)
    assert target is not None and target.id == "d1"  # a redeploy of v2 is not a step back


def test_nothing_to_roll_back_to() -> None:
    assert rollback_target([]) is None
    assert rollback_target([record(1, "v1", DeployState.SUCCEEDED)]) is None
    assert (
        rollback_target(
            [record(1, "v1", DeployState.FAILED), record(2, "v2", DeployState.SUCCEEDED)]
        )
        is None
    )


def test_the_live_release_is_the_newest_success() -> None:
    records = [
        record(1, "v1", DeployState.SUCCEEDED),
        record(2, "v2", DeployState.SUCCEEDED),
        record(3, "v3", DeployState.ROLLED_BACK),
        record(4, "v4", DeployState.RUNNING),
    ]
    live = live_release(records)
    assert live is not None and live.id == "d2"
    assert live_release([record(1, "v1", DeployState.FAILED)]) is None
