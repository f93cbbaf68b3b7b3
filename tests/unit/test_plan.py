"""The original's instance-count rule and its two 400s (docs/compatibility.md §2.2)."""

import pytest

from deployster.events import DeployRequested
from deployster.naming import UnitName
from handlers.deploys import DeployRejectedError, plan

TS1, TS2 = "2015.03.02-00.31.45", "2015.03.03-00.00.00"


def request(count: int = 0, destroy: bool = False) -> DeployRequested:
    return DeployRequested(
        service="web",
        deploy_id="d",
        version="v2",
        timestamp=TS2,
        instance_count=count,
        destroy_previous=destroy,
    )


def units(version: str, ts: str, n: int) -> list[UnitName]:
    return [UnitName("web", version, ts, i) for i in range(1, n + 1)]


def test_first_deploy_defaults_to_one_instance_and_cannot_destroy_anything() -> None:
    assert plan(request(destroy=True), []) == (1, False)


def test_count_follows_the_one_running_release() -> None:
    assert plan(request(destroy=True), units("v1", TS1, 3)) == (3, True)


def test_an_explicit_count_wins() -> None:
    assert plan(request(count=5, destroy=True), units("v1", TS1, 3)) == (5, True)


def test_several_releases_give_one_instance_without_destroy() -> None:
    current = units("v1", TS1, 2) + units("v1", TS2, 2)
    assert plan(request(), current) == (1, False)


def test_several_releases_refuse_destroy_previous_with_the_original_text() -> None:
    current = units("v1", TS1, 2) + units("v0", TS2, 1)
    with pytest.raises(DeployRejectedError) as err:
        plan(request(destroy=True), current)
    # The original's text, byte for byte (two spaces after each full stop).
    assert str(err.value) == (
        "Too many versions are running.  Destroying previous units is not supported when more "
        "than one version is currently running."
    )


def test_fewer_instances_than_running_refuse_destroy_previous() -> None:
    with pytest.raises(DeployRejectedError) as err:
        plan(request(count=2, destroy=True), units("v1", TS1, 3))
    assert str(err.value) == (
        "A greater number of instances than what was specified is already running.  Make sure "
        "this number is less than or equal to the number already running or disable destroying "
        "previous units."
    )


def test_fewer_instances_are_fine_when_old_units_stay() -> None:
    assert plan(request(count=2), units("v1", TS1, 3)) == (2, False)
