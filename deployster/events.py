"""The event vocabulary: one pydantic model per thing that happened or is asked for.

Routes publish requests (``...Requested``); handlers publish what came of them. Every event
names its service, which is also its lane on the bus: events of one service are handled in
order, different services in parallel.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field


def now() -> datetime:
    """The time events and records are stamped with: aware, in UTC."""
    return datetime.now(UTC)


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    service: str
    # Ties an answer (or a handler's failure) to the event that caused it.
    id: str = Field(default_factory=lambda: secrets.token_hex(8))
    at: datetime = Field(default_factory=now)

    @property
    def log_context(self) -> dict[str, str]:
        """Fields every log line about this event carries."""
        context = {"service": self.service, "event_type": type(self).__name__}
        deploy_id = getattr(self, "deploy_id", None)
        if deploy_id:
            context["deploy_id"] = deploy_id
        return context


class DeployRequested(Event):
    """A deploy asked for through the API or a rollback (a webhook push's deploy is written by
    the service's deploy worker: ``PushTaken``)."""

    deploy_id: str
    version: str
    timestamp: str
    instance_count: int = 0  # 0: as many as run now, or 1 (the original's rule)
    destroy_previous: bool = False
    env: dict[str, str] = Field(default_factory=dict, repr=False)
    source: str = "api"
    actor: str = ""
    # When another deploy of the service runs: queue behind it instead of a 409.
    wait_for_lock: bool = False


class DeployQueued(Event):
    """The deploy waits for another deploy of the service to finish (it asked to wait)."""

    deploy_id: str
    behind: str  # the deploy id holding the lock


class DeployRejected(Event):
    """The deploy cannot start as asked; nothing was submitted and no record was written."""

    deploy_id: str
    description: str
    status: int = 400  # 409 when another deploy of the service holds its lock


class UnitsSubmitted(Event):
    """Every unit of the deploy was created in fleet and set to ``launched``."""

    deploy_id: str
    units: list[str]


class DeploySucceeded(Event):
    deploy_id: str
    duration: float = 0.0  # seconds from the request to the end


class DeployFailed(Event):
    """The deploy ended without reaching its goal; ``reason`` says why in a sentence."""

    deploy_id: str
    reason: str
    state: str = "failed"  # or "rolled_back"
    duration: float = 0.0  # seconds from the request to the end (0: it never started)


class DestroyRequested(Event):
    """Destroy the units of one version (optionally one timestamp) of a service."""

    request_id: str
    version: str
    timestamp: str | None = None


class UnitsDestroyed(Event):
    request_id: str
    units: list[str]
    # unit name -> what fleet said, for the units that could not be destroyed
    failures: dict[str, str] = Field(default_factory=dict)


class InstanceHealthy(Event):
    """An announced instance passed its health checks and is registered with the router."""

    unit: str
    url: str


class InstanceUnhealthy(Event):
    """A routed instance failed its health checks and was taken out of the router."""

    unit: str
    url: str
    detail: str


class InstanceWithdrawn(Event):
    """The instance's announcement is gone (its unit stopped or was reaped)."""

    unit: str
    url: str


class TaskFinished(Event):
    """A one-off task ended (its record holds the state and the exit code)."""

    task_id: str


class ImagePushed(Event):
    """A registry reported a push of ``repository:tag`` (a webhook, authenticated by its
    secret), and ``repository`` names this service's image. Whether it deploys is the
    webhooks handler's decision (the service's auto-deploy policy)."""

    source: str  # dockerhub, registry, harbor, ghcr
    repository: str
    tag: str
    digest: str = ""
    event_id: str  # the provider's delivery or event id: the de-duplication key
    # Docker Hub only: where to report the deploy's outcome.
    callback_url: str = Field("", repr=False)


class PushDecided(Event):
    """What came of an ``ImagePushed``: ``queued`` (a deploy follows when the service is
    free) or ``ignored``, with the reason in a sentence."""

    push_id: str  # the ImagePushed event's id
    decision: str
    reason: str


class PushTaken(Event):
    """The service's deploy worker took its queued push: the push starts deploy ``deploy_id``
    (written as a queued deploy in the same etcd transaction), or, with no deploy id, it was
    dropped for ``reason``."""

    push: ImagePushed
    deploy_id: str = ""
    reason: str = ""
