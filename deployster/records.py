"""Deployster's records, as etcd keeps them: deploys, their progress events, lock holders and
one-off tasks. Pydantic models, stored as JSON; `deployster.store` reads and writes them, the key
layout is `deployster.keys`.

A deploy record carries its progress events, so the events stream is the record followed
through an etcd watch. It keeps its newest ``MAX_EVENTS`` events and counts the ones it
dropped, so it never grows without bound.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployster import logs
from deployster.events import DeployRequested, now
from deployster.policy import ServicePolicy

# Progress events kept in a deploy record: a 100-instance deploy notes about 500, and a record
# must stay far below etcd's 1.5 MiB limit on a value.
MAX_EVENTS = 200


class DeployState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def finished(self) -> bool:
        return self not in (DeployState.PENDING, DeployState.RUNNING)


class DeployStep(StrEnum):
    """Where a running deploy is; a restarted server resumes from here."""

    QUEUED = "queued"  # waiting for another deploy of the service to release its lock
    SUBMITTING = "submitting"
    WAITING = "waiting"  # for every new instance to be healthy and routed
    SWITCHING = "switching"  # deregistering, draining and destroying the previous units
    ROLLING_BACK = "rolling_back"
    DONE = "done"


class Progress(BaseModel):
    """One thing that happened in a deploy, as its events stream shows it."""

    seq: int  # 1, 2, ...: the SSE event id, for a client resuming with Last-Event-ID
    at: datetime = Field(default_factory=now)
    kind: str  # planned, queued, submitted, instance_ready, routed, retiring, ..., succeeded
    message: str
    unit: str | None = None


def new_deploy_id() -> str:
    """Sortable by creation time (newest last), unique without coordination."""
    return now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class DeployFields(BaseModel):
    """A deploy as the API shows it, but for ``env``: the record stores the values, the API
    shows the names (``DeployRecord.public``)."""

    id: str
    service: str
    version: str
    timestamp: str
    instance_count: int
    destroy_previous: bool
    source: str = "api"
    actor: str = ""
    state: DeployState = DeployState.PENDING
    step: DeployStep = DeployStep.SUBMITTING
    # The service's policy when the deploy started: a later change applies to the next one.
    policy: ServicePolicy = Field(default_factory=ServicePolicy)
    units: list[str] = Field(default_factory=list)
    previous_units: list[str] = Field(default_factory=list)
    error: str | None = None
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    finished_at: datetime | None = None
    started_at: float = (
        0.0  # epoch seconds the lock was taken: the deploy deadline counts from here
    )
    submitted_at: float = 0.0  # epoch seconds: instance deadlines count from here
    events: list[Progress] = Field(default_factory=list)
    events_dropped: int = 0  # the oldest events, left out to keep the newest MAX_EVENTS


class DeployRecord(DeployFields):
    # Values may be secrets: kept for re-driving the deploy, never returned by the API.
    env: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("env")
    @classmethod
    def _never_logged(cls, env: dict[str, str]) -> dict[str, str]:
        return logs.register_env(env)  # a record read back (e.g. to resume) is a deploy handled

    def note(self, kind: str, message: str, unit: str | None = None) -> None:
        """Add a progress event; it is kept (and streamed) with the record's next save. Past
        ``MAX_EVENTS`` the oldest is dropped; ``seq`` keeps counting every event."""
        seq = self.events_dropped + len(self.events) + 1
        self.events.append(Progress(seq=seq, kind=kind, message=message, unit=unit))
        if len(self.events) > MAX_EVENTS:
            del self.events[0]
            self.events_dropped += 1

    @classmethod
    def from_request(
        cls,
        event: DeployRequested,
        instance_count: int,
        destroy_previous: bool,
        policy: ServicePolicy,
    ) -> DeployRecord:
        return cls(
            id=event.deploy_id,
            service=event.service,
            version=event.version,
            timestamp=event.timestamp,
            instance_count=instance_count,
            destroy_previous=destroy_previous,
            env=event.env,
            source=event.source,
            actor=event.actor,
            policy=policy,
        )

    def public(self) -> dict[str, object]:
        """The record as the API shows it: env values are left out."""
        data = self.model_dump(mode="json", exclude={"env"})
        data["env"] = sorted(self.env)
        return data


class DeploySummary(BaseModel):
    """What a listing of every service needs of a deploy record: decoding only these fields
    of a record (not its events, environment and policy) is several times faster, and they
    take a fraction of the memory."""

    model_config = ConfigDict(extra="ignore")

    id: str
    service: str
    version: str
    timestamp: str
    state: DeployState
    created_at: datetime


class LockHolder(BaseModel):
    """Who holds a service's deploy lock, and why; the key lives as long as ``lease``."""

    holder: str  # the deploy id
    actor: str = ""
    reason: str = ""
    since: datetime = Field(default_factory=now)
    lease: int


# -- tasks --------------------------------------------------------------------------------


class TaskState(StrEnum):
    PENDING = "pending"  # pulling the image, creating the container
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # exit code 0
    FAILED = "failed"  # any other exit code
    TIMED_OUT = "timed_out"  # killed at its limit: exit code 124
    ERROR = "error"  # never started, or lost (the sentence in ``error`` says which)

    @property
    def finished(self) -> bool:
        return self not in (TaskState.PENDING, TaskState.RUNNING)


def new_task_id() -> str:
    """Sortable by creation time (newest last), unique without coordination."""
    return now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(4)


class TaskRecord(BaseModel):
    """One one-off task: what ran, how it ended, and the end of its output."""

    id: str
    service: str
    version: str
    image: str
    command: list[str]  # the container's Cmd
    timeout: float
    # Only the names: the values may be secrets.
    env: list[str] = Field(default_factory=list)
    container: str = ""  # the container's name, unique per task
    actor: str = ""
    state: TaskState = TaskState.PENDING
    exit_code: int | None = None
    error: str = ""
    cleanup_error: str = ""  # the container could not be removed
    output: str = ""  # the last bytes of stdout and stderr, as they interleaved
    output_truncated: bool = False  # earlier output was dropped from ``output``
    created_at: datetime = Field(default_factory=now)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def public(self) -> dict[str, object]:
        return self.model_dump(mode="json")
