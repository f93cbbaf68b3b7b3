"""The deploy state machine, in one place: what a deploy does next, as a pure function.

A service's worker (``handlers/deploys.py``) reads what is wanted (the deploy record) and what
is (fleet's units and their states, the instances' health and routing), and asks
:func:`next_step` what to do; it performs that step idempotently, records it, and asks again.
Nothing here does I/O or reads a clock: every input is in ``record`` and :class:`Observed`, so
the whole transition table is tested without etcd, fleet or a router.

::

    QUEUED ──(lock free, its turn)──► Plan ──► SUBMITTING ──► Submit ──► WAITING
    WAITING ──(all new instances healthy for min_healthy_time)──► ConfirmRouted
            ──► SWITCHING (destroy_previous) or succeeded
    WAITING ──(a new unit failed, or a deadline passed)──► StartRollback ──► ROLLING_BACK
    SWITCHING ──► Retire previous ──► drain ──► Destroy previous (until fleet lists none)
            ──► succeeded
    ROLLING_BACK ──► Remove new (deregister, then destroy, until fleet lists none)
            ──► rolled_back

``succeeded``, ``failed`` and ``rolled_back`` are terminal: :func:`next_step` answers
:class:`Done` for them whatever is observed, so no retry can leave them. ``ROLLING_BACK``
leads only to removing the new units and ``rolled_back``: a rollback never reaches the
switch. ``succeeded`` needs the router's confirmation (``ConfirmRouted``, ``Retire``) and
fleet listing none of the previous units.

What an error means is decided here too: a temporary error is retried by the worker as it is
(the deadlines below end a deploy that cannot go on), and :func:`on_permanent` says where a
permanent one leads from each step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deployster.records import DeployRecord, DeployState, DeployStep

# Seconds between looks while instances come up, at most: an instance that becomes healthy,
# unhealthy or withdrawn wakes the worker at once, and one that will be ready after its
# min_healthy_time is looked at again exactly then.
WAIT_POLL = 0.5
QUEUE_POLL = 0.5  # seconds between looks whether a queued deploy's turn came


@dataclass(frozen=True)
class InstanceView:
    """One announced instance as the instances handler sees it now."""

    url: str
    healthy_for: float | None = None  # seconds healthy without a break; None: not healthy
    routed: bool = False
    last_probe: str = "no probe has answered yet"


@dataclass(frozen=True)
class Observed:
    """What is, for one service, read just before the step is chosen."""

    now: float  # epoch seconds
    fleet_units: frozenset[str] = frozenset()  # the service's unit names fleet lists
    # unit -> why it failed, in a sentence: systemd's state and the unit's last log lines
    failed: Mapping[str, str] = field(default_factory=dict)
    instances: Mapping[str, InstanceView] = field(default_factory=dict)  # unit -> instance
    may_start: bool = False  # a queued deploy: the lock is free and it is the oldest queued


Note = tuple[str, str, str | None]  # (kind, message, unit): a progress event to record


# -- steps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """The deploy is finished: nothing is ever done to it again."""


@dataclass(frozen=True)
class Wait:
    """Look again after ``delay`` seconds; record ``notes`` first."""

    delay: float
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Take the service's lock, plan against fleet's units, and move to SUBMITTING."""


@dataclass(frozen=True)
class Submit:
    """Create, then launch, every new unit (a unit that exists already is no error)."""

    units: tuple[str, ...]


@dataclass(frozen=True)
class ConfirmRouted:
    """Wait until the router serves every new instance's URL."""

    urls: tuple[str, ...]
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True)
class StartRollback:
    """Record the reason and move to ROLLING_BACK."""

    reason: str
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True)
class Retire:
    """Deregister the previous units and wait until the router applied it (then drain)."""

    units: tuple[str, ...]


@dataclass(frozen=True)
class Destroy:
    """Destroy these units in fleet (a unit that is gone already is no error)."""

    units: tuple[str, ...]


@dataclass(frozen=True)
class Remove:
    """Rolling back: deregister these new units, wait for the router, then destroy them."""

    units: tuple[str, ...]


@dataclass(frozen=True)
class Finish:
    """Reach a terminal state, record it, release the lock, tell the bus."""

    state: DeployState
    error: str | None = None
    notes: tuple[Note, ...] = ()


Step = (
    Done | Wait | Plan | Submit | ConfirmRouted | StartRollback | Retire | Destroy | Remove | Finish
)


# -- the transition table ------------------------------------------------------------------


def next_step(record: DeployRecord, observed: Observed) -> Step:
    """The one step that brings ``record`` closer to its goal, given what is observed."""
    if record.state.finished:
        return Done()
    deploy_deadline = deploy_deadline_of(record)
    if record.step is DeployStep.QUEUED:
        if observed.now > record.created_at.timestamp() + record.policy.deploy_deadline:
            deadline = f"the deploy deadline of {record.policy.deploy_deadline:g} s"
            if observed.may_start:  # its turn came, but planning kept failing (fleet, etcd)
                return Finish(
                    DeployState.FAILED,
                    f"the deploy could not be planned within {deadline}: fleet or etcd did "
                    "not answer in time (the server's log has each attempt)",
                )
            return Finish(DeployState.FAILED, f"the service's lock was not free within {deadline}")
        return Plan() if observed.may_start else Wait(QUEUE_POLL)
    if record.step is DeployStep.SUBMITTING:
        if observed.now > deploy_deadline:
            return StartRollback(
                f"fleet did not take the units within the deploy deadline of "
                f"{record.policy.deploy_deadline:g} s"
            )
        return Submit(tuple(record.units))
    if record.step is DeployStep.WAITING:
        return _waiting(record, observed, deploy_deadline)
    if record.step is DeployStep.SWITCHING:
        return _switching(record, observed)
    if record.step is DeployStep.ROLLING_BACK:
        left = tuple(u for u in record.units if u in observed.fleet_units)
        return Remove(left) if left else Finish(DeployState.ROLLED_BACK, record.error)
    # DONE without a finished state: a record written half-way by an older server.
    return Finish(DeployState.FAILED, record.error or "the deploy ended without a result")


def deploy_deadline_of(record: DeployRecord) -> float:
    return (record.started_at or record.created_at.timestamp()) + record.policy.deploy_deadline


def _waiting(record: DeployRecord, observed: Observed, deploy_deadline: float) -> Step:
    for unit in record.units:
        if unit in observed.failed:
            return StartRollback(observed.failed[unit])
    policy = record.policy
    noted = {(e.kind, e.unit) for e in record.events}
    notes: list[Note] = []
    ready: dict[str, str] = {}  # unit -> url
    delay = WAIT_POLL
    for unit in record.units:
        instance = observed.instances.get(unit)
        if instance is None or not instance.routed or instance.healthy_for is None:
            continue
        if instance.healthy_for >= policy.min_healthy_time:
            ready[unit] = instance.url
            kind, message = "instance_ready", f"{unit} is healthy and routed at {instance.url}"
        else:
            delay = min(delay, policy.min_healthy_time - instance.healthy_for)
            kind = "instance_healthy"
            message = (
                f"{unit} passes its health check and is routed at {instance.url}; "
                f"ready once healthy for {policy.min_healthy_time:g} s"
            )
        if (kind, unit) not in noted:
            notes.append((kind, message, unit))
    if len(ready) == len(record.units):
        if observed.now > deploy_deadline:  # the router never confirmed them
            return StartRollback(
                "the router did not route the new instances within the deploy deadline of "
                f"{policy.deploy_deadline:g} s",
                tuple(notes),
            )
        return ConfirmRouted(tuple(ready.values()), tuple(notes))
    instance_deadline = record.submitted_at + policy.instance_deadline
    if observed.now > min(instance_deadline, deploy_deadline):
        late = [u for u in record.units if u not in ready]
        return StartRollback(
            _late_reason(record, observed, late, observed.now > deploy_deadline), tuple(notes)
        )
    deadline = min(instance_deadline, deploy_deadline) - observed.now
    return Wait(min(delay, deadline + 0.01), tuple(notes))  # just past the deadline, at most


def _late_reason(
    record: DeployRecord, observed: Observed, late: list[str], whole_deploy: bool
) -> str:
    unit = late[0]
    instance = observed.instances.get(unit)
    seen = instance.last_probe if instance else "it never announced itself"
    limit = (
        f"the deploy deadline of {record.policy.deploy_deadline:g} s"
        if whole_deploy
        else f"its deadline of {record.policy.instance_deadline:g} s"
    )
    more = f" (and {len(late) - 1} more)" if len(late) > 1 else ""
    return f"instance {unit} was not healthy within {limit}{more}; last probe: {seen}"


def _switching(record: DeployRecord, observed: Observed) -> Step:
    retired = next((e for e in record.events if e.kind == "retiring"), None)
    if retired is None:
        return Retire(tuple(record.previous_units))
    drained_at = retired.at.timestamp() + record.policy.drain
    if observed.now < drained_at:
        return Wait(drained_at - observed.now)
    left = tuple(u for u in record.previous_units if u in observed.fleet_units)
    if left:
        return Destroy(left)
    return Finish(
        DeployState.SUCCEEDED,
        notes=(
            (
                "previous_destroyed",
                f"destroyed {len(record.previous_units)} previous unit(s)",
                None,
            ),
        ),
    )


def on_permanent(record: DeployRecord, sentence: str) -> Step:
    """Where a permanent error (``sentence``) met at ``record``'s step leads: before the units
    run, the deploy fails; while the new release comes up, it is rolled back; once the switch
    or a rollback has started, the deploy fails with the sentence and nothing more is tried."""
    if record.state.finished:
        return Done()
    if record.step is DeployStep.WAITING:
        return StartRollback(sentence)
    return Finish(DeployState.FAILED, sentence)
