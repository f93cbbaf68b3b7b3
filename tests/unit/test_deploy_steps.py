"""The deploy state machine's whole transition table: every step, every observation that
matters there, and where every error at every step leads."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from deployster.errors import PermanentError, TemporaryError, is_temporary
from deployster.etcd import EtcdError, LeaseExpiredError
from deployster.fleet import (
    FleetConflictError,
    FleetNotFoundError,
    FleetRejectedError,
    FleetUnavailableError,
)
from deployster.policy import ServicePolicy
from deployster.records import DeployRecord, DeployState, DeployStep, Progress
from deployster.routers import RouterRefusedError, RouterTimeoutError, RouterUnavailableError
from handlers.deploys import DeployRejectedError
from handlers.reconcile import (
    QUEUE_POLL,
    WAIT_POLL,
    ConfirmRouted,
    Destroy,
    Done,
    Finish,
    InstanceView,
    Observed,
    Plan,
    Remove,
    Retire,
    StartRollback,
    Submit,
    Wait,
    next_step,
    on_permanent,
)

T0 = 1_800_000_000.0  # the deploy was created, locked and submitted at this epoch second
NEW = ("web:v2:t@1.service", "web:v2:t@2.service")
OLD = ("web:v1:t@1.service", "web:v1:t@2.service")
POLICY = ServicePolicy(min_healthy_time=5, instance_deadline=60, deploy_deadline=120, drain=10)


def record(
    step: DeployStep,
    state: DeployState = DeployState.RUNNING,
    destroy_previous: bool = True,
    events: tuple[tuple[str, str | None], ...] = (),
    error: str | None = None,
) -> DeployRecord:
    rec = DeployRecord(
        id="d2",
        service="web",
        version="v2",
        timestamp="t",
        instance_count=2,
        destroy_previous=destroy_previous,
        state=state,
        step=step,
        policy=POLICY,
        units=list(NEW),
        previous_units=list(OLD) if destroy_previous else [],
        error=error,
        created_at=datetime.fromtimestamp(T0, UTC),
        started_at=T0,
        submitted_at=T0,
    )
    rec.events = [
        Progress(seq=n, kind=kind, message=kind, unit=unit, at=datetime.fromtimestamp(T0, UTC))
        for n, (kind, unit) in enumerate(events, 1)
    ]
    return rec


def ready(*units: str, healthy_for: float = 9.0) -> dict[str, InstanceView]:
    return {
        u: InstanceView(url=f"http://h:{n}", healthy_for=healthy_for, routed=True)
        for n, u in enumerate(units)
    }


def seen(now: float = T0 + 1, **kw: object) -> Observed:
    return Observed(now=now, **kw)  # type: ignore[arg-type]


ALL_READY = ready(*NEW)
URLS = tuple(v.url for v in ALL_READY.values())

# (name, record, observed, expected step): the transition table, row by row.
TABLE = [
    # queued: waits its turn, plans when the lock is free, gives up at its deadline
    (
        "queued, not its turn",
        record(DeployStep.QUEUED, DeployState.PENDING),
        seen(),
        Wait(QUEUE_POLL),
    ),
    (
        "queued, its turn",
        record(DeployStep.QUEUED, DeployState.PENDING),
        seen(may_start=True),
        Plan(),
    ),
    (
        "queued past the deadline, the lock still held",
        record(DeployStep.QUEUED, DeployState.PENDING),
        seen(T0 + 121),
        Finish(
            DeployState.FAILED,
            "the service's lock was not free within the deploy deadline of 120 s",
        ),
    ),
    (
        "queued past the deadline, its turn came but planning kept failing",
        record(DeployStep.QUEUED, DeployState.PENDING),
        seen(T0 + 121, may_start=True),
        Finish(
            DeployState.FAILED,
            "the deploy could not be planned within the deploy deadline of 120 s: fleet or "
            "etcd did not answer in time (the server's log has each attempt)",
        ),
    ),
    # submitting
    ("submitting", record(DeployStep.SUBMITTING, DeployState.PENDING), seen(), Submit(NEW)),
    (
        "submitting past the deadline",
        record(DeployStep.SUBMITTING, DeployState.PENDING),
        seen(T0 + 121),
        StartRollback("fleet did not take the units within the deploy deadline of 120 s"),
    ),
    # waiting
    ("waiting, nothing announced", record(DeployStep.WAITING), seen(), Wait(WAIT_POLL)),
    (
        "waiting, one healthy but not long enough",
        record(DeployStep.WAITING),
        seen(instances=ready(NEW[0], healthy_for=1)),
        Wait(
            WAIT_POLL,
            (
                (
                    "instance_healthy",
                    f"{NEW[0]} passes its health check and is routed at http://h:0; "
                    "ready once healthy for 5 s",
                    NEW[0],
                ),
            ),
        ),
    ),
    (
        "waiting, one ready in 0.25 s: looked at again then",
        record(DeployStep.WAITING, events=(("instance_healthy", NEW[0]),)),
        seen(instances=ready(NEW[0], healthy_for=4.75)),
        Wait(0.25),
    ),
    (
        "waiting, the deadline comes before the next poll",
        record(DeployStep.WAITING),
        seen(T0 + 59.75),
        Wait(0.26),
    ),
    (
        "waiting, healthy but not routed yet",
        record(DeployStep.WAITING),
        seen(instances={NEW[0]: InstanceView(url="http://h:0", healthy_for=9, routed=False)}),
        Wait(WAIT_POLL),
    ),
    (
        "waiting, all ready: confirm with the router",
        record(DeployStep.WAITING, events=(("instance_ready", NEW[0]),)),
        seen(instances=ALL_READY),
        ConfirmRouted(
            URLS, (("instance_ready", f"{NEW[1]} is healthy and routed at http://h:1", NEW[1]),)
        ),
    ),
    (
        "waiting, all ready past the instance deadline: still confirmed",
        record(DeployStep.WAITING, events=(("instance_ready", NEW[0]), ("instance_ready", NEW[1]))),
        seen(T0 + 61, instances=ALL_READY),
        ConfirmRouted(URLS),
    ),
    (
        "waiting, all ready past the deploy deadline: the router never confirmed",
        record(DeployStep.WAITING, events=(("instance_ready", NEW[0]), ("instance_ready", NEW[1]))),
        seen(T0 + 121, instances=ALL_READY),
        StartRollback(
            "the router did not route the new instances within the deploy deadline of 120 s"
        ),
    ),
    (
        "waiting, a new unit failed",
        record(DeployStep.WAITING),
        seen(failed={NEW[1]: f"unit {NEW[1]} failed (systemd failed/failed)"}, instances=ALL_READY),
        StartRollback(f"unit {NEW[1]} failed (systemd failed/failed)"),
    ),
    (
        "waiting past the instance deadline",
        record(DeployStep.WAITING),
        seen(
            T0 + 61,
            instances={
                NEW[0]: InstanceView(url="http://h:0", last_probe="HTTP 503"),
                **ready(NEW[1]),
            },
        ),
        StartRollback(
            f"instance {NEW[0]} was not healthy within its deadline of 60 s; last probe: HTTP 503",
            (("instance_ready", f"{NEW[1]} is healthy and routed at http://h:0", NEW[1]),),
        ),
    ),
    (
        "waiting past the deploy deadline, nothing announced",
        record(DeployStep.WAITING).model_copy(update={"submitted_at": T0 + 100}),
        seen(T0 + 121),
        StartRollback(
            f"instance {NEW[0]} was not healthy within the deploy deadline of 120 s "
            "(and 1 more); last probe: it never announced itself"
        ),
    ),
    # switching: retire, drain, destroy until fleet lists none, then succeed
    ("switching, not retired", record(DeployStep.SWITCHING), seen(), Retire(OLD)),
    (
        "switching, draining",
        record(DeployStep.SWITCHING, events=(("retiring", None),)),
        seen(T0 + 4, fleet_units=frozenset(OLD + NEW)),
        Wait(6.0),
    ),
    (
        "switching, drained, old units still listed",
        record(DeployStep.SWITCHING, events=(("retiring", None),)),
        seen(T0 + 10, fleet_units=frozenset(OLD[1:] + NEW)),
        Destroy(OLD[1:]),
    ),
    (
        "switching, fleet lists none of the old units",
        record(DeployStep.SWITCHING, events=(("retiring", None),)),
        seen(T0 + 11, fleet_units=frozenset(NEW)),
        Finish(
            DeployState.SUCCEEDED,
            notes=(("previous_destroyed", "destroyed 2 previous unit(s)", None),),
        ),
    ),
    # rolling back: remove the new units until fleet lists none, never the old ones
    (
        "rolling back, new units listed",
        record(DeployStep.ROLLING_BACK, error="bad"),
        seen(fleet_units=frozenset(OLD + NEW)),
        Remove(NEW),
    ),
    (
        "rolling back, new units gone",
        record(DeployStep.ROLLING_BACK, error="bad"),
        seen(fleet_units=frozenset(OLD)),
        Finish(DeployState.ROLLED_BACK, "bad"),
    ),
    (
        "rolling back, healthy instances do not matter",
        record(DeployStep.ROLLING_BACK, error="bad"),
        seen(fleet_units=frozenset(OLD), instances=ALL_READY),
        Finish(DeployState.ROLLED_BACK, "bad"),
    ),
    (
        "done but not finished (an old server's half write)",
        record(DeployStep.DONE),
        seen(),
        Finish(DeployState.FAILED, "the deploy ended without a result"),
    ),
]


@pytest.mark.parametrize(
    ("rec", "observed", "expected"), [r[1:] for r in TABLE], ids=[r[0] for r in TABLE]
)
def test_transition(rec: DeployRecord, observed: Observed, expected: object) -> None:
    assert next_step(rec, observed) == expected


def test_without_destroy_previous_the_routed_release_is_the_end() -> None:
    # ConfirmRouted leads to SWITCHING only with destroy_previous: the worker finishes then.
    rec = record(DeployStep.WAITING, destroy_previous=False)
    assert isinstance(next_step(rec, seen(instances=ALL_READY)), ConfirmRouted)


TERMINAL = [DeployState.SUCCEEDED, DeployState.FAILED, DeployState.ROLLED_BACK]
OBSERVATIONS = [
    seen(),
    seen(T0 + 10_000, may_start=True),
    seen(fleet_units=frozenset(OLD + NEW), failed={NEW[0]: "failed/x"}, instances=ALL_READY),
]


@pytest.mark.parametrize("state", TERMINAL)
@pytest.mark.parametrize("step", list(DeployStep))
def test_no_observation_leaves_a_terminal_state(state: DeployState, step: DeployStep) -> None:
    for observed in OBSERVATIONS:
        assert next_step(record(step, state), observed) == Done()
        assert on_permanent(record(step, state), "boom") == Done()


@pytest.mark.parametrize("observed", OBSERVATIONS)
def test_a_rollback_never_reaches_the_switch(observed: Observed) -> None:
    rec = record(DeployStep.ROLLING_BACK, error="bad", events=(("retiring", None),))
    step = next_step(rec, observed)
    assert isinstance(step, (Remove, Finish)), step
    if isinstance(step, Remove):
        assert set(step.units) <= set(NEW)  # never a unit of the live release
    else:
        assert step.state is DeployState.ROLLED_BACK


# -- errors: what each adapter's errors mean, and where a permanent one leads ---------------

TEMPORARY = [
    EtcdError("etcd did not answer"),
    LeaseExpiredError(0x1F),
    FleetUnavailableError("fleet at x is unreachable"),
    RouterUnavailableError("Could not register: etcd down"),
    RouterTimeoutError("Traefik did not apply"),
]
PERMANENT = [
    FleetRejectedError("fleet answered PUT /units/x with 400"),
    FleetConflictError("409"),
    FleetNotFoundError("404"),
    RouterRefusedError("Server id 'a b' is not valid"),
    DeployRejectedError("Too many versions are running."),
]


@pytest.mark.parametrize("error", TEMPORARY, ids=lambda e: type(e).__name__)
def test_temporary_errors(error: Exception) -> None:
    assert is_temporary(error) and isinstance(error, TemporaryError)


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_permanent_errors(error: Exception) -> None:
    assert not is_temporary(error) and isinstance(error, PermanentError)


def test_a_bug_is_not_temporary() -> None:
    assert not is_temporary(KeyError("x"))


# A temporary error at any step changes nothing: the same step is chosen again on the next
# pass, until a deadline (in the table above) says otherwise. A permanent one leads here:
PERMANENT_AT = [
    (DeployStep.QUEUED, DeployState.PENDING, Finish(DeployState.FAILED, "boom")),
    (DeployStep.SUBMITTING, DeployState.PENDING, Finish(DeployState.FAILED, "boom")),
    (DeployStep.WAITING, DeployState.RUNNING, StartRollback("boom")),
    (DeployStep.SWITCHING, DeployState.RUNNING, Finish(DeployState.FAILED, "boom")),
    (DeployStep.ROLLING_BACK, DeployState.RUNNING, Finish(DeployState.FAILED, "boom")),
    (DeployStep.DONE, DeployState.RUNNING, Finish(DeployState.FAILED, "boom")),
]


@pytest.mark.parametrize(
    ("step", "state", "expected"), PERMANENT_AT, ids=[str(r[0]) for r in PERMANENT_AT]
)
def test_a_permanent_error_at_each_step(
    step: DeployStep, state: DeployState, expected: object
) -> None:
    assert on_permanent(record(step, state), "boom") == expected


@pytest.mark.parametrize("name", [r[0] for r in TABLE])
def test_a_temporary_error_repeats_the_step(name: str) -> None:
    """The worker retries after a temporary error by asking again: the answer is the same
    as long as nothing observable changed (the step is idempotent, so doing it twice is safe)."""
    _, rec, observed, expected = next(r for r in TABLE if r[0] == name)
    assert next_step(rec, observed) == next_step(rec, observed) == expected
