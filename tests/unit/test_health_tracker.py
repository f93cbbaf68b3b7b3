"""HealthTracker: thresholds and transitions, without the network."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployster.health import (
    HealthState,
    HealthTracker,
    ProbeResult,
    Transition,
)
from deployster.policy import HealthPolicy

OK = ProbeResult(ok=True, status=200, detail="HTTP 200", duration=0.01)
FAIL = ProbeResult(ok=False, status=503, detail="HTTP 503", duration=0.01)


def feed(tracker: HealthTracker, pattern: str) -> list[Transition | None]:
    return [tracker.observe(OK if c == "+" else FAIL) for c in pattern]


def test_defaults_follow_the_architecture() -> None:
    check = HealthPolicy()
    assert (check.path, check.interval, check.timeout) == ("/health", 1.0, 2.0)
    assert (check.healthy_threshold, check.unhealthy_threshold) == (2, 3)


@pytest.mark.parametrize(
    "field", ["interval", "timeout", "healthy_threshold", "unhealthy_threshold"]
)
def test_nonpositive_settings_are_rejected(field: str) -> None:
    with pytest.raises(ValidationError):
        HealthPolicy(**{field: 0})


def test_starts_unknown_and_needs_two_successes() -> None:
    tracker = HealthTracker(HealthPolicy())
    assert tracker.state is HealthState.UNKNOWN and not tracker.healthy
    assert tracker.observe(OK) is None
    assert tracker.state is HealthState.UNKNOWN
    assert tracker.observe(OK) is Transition.BECAME_HEALTHY
    assert tracker.healthy
    assert feed(tracker, "+++") == [None, None, None]  # no repeated transition


def test_three_consecutive_failures_make_it_unhealthy() -> None:
    tracker = HealthTracker(HealthPolicy())
    feed(tracker, "++")
    assert feed(tracker, "--") == [None, None]
    assert tracker.healthy  # two failures are tolerated
    assert tracker.observe(FAIL) is Transition.BECAME_UNHEALTHY
    assert tracker.state is HealthState.UNHEALTHY
    assert feed(tracker, "---") == [None, None, None]


def test_a_success_resets_the_failure_count_and_vice_versa() -> None:
    tracker = HealthTracker(HealthPolicy())
    feed(tracker, "++")
    assert feed(tracker, "--+--+--") == [None] * 8
    assert tracker.healthy
    assert feed(tracker, "-") == [Transition.BECAME_UNHEALTHY]
    assert feed(tracker, "+-+-+") == [None] * 5  # flapping never recovers
    assert feed(tracker, "+") == [Transition.BECAME_HEALTHY]


def test_never_healthy_instance_becomes_unhealthy_from_unknown() -> None:
    tracker = HealthTracker(HealthPolicy())
    assert feed(tracker, "---") == [None, None, Transition.BECAME_UNHEALTHY]


def test_thresholds_of_one_flip_on_every_change() -> None:
    tracker = HealthTracker(HealthPolicy(healthy_threshold=1, unhealthy_threshold=1))
    assert feed(tracker, "+-+") == [
        Transition.BECAME_HEALTHY,
        Transition.BECAME_UNHEALTHY,
        Transition.BECAME_HEALTHY,
    ]


def test_takes_the_stored_policy_and_transitions_compare_as_strings() -> None:
    tracker = HealthTracker(HealthPolicy(healthy_threshold=3))
    assert feed(tracker, "+++")[-1] == "became_healthy"
